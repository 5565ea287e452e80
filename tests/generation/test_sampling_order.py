"""The order of the logits filters, pinned on vectors where another order gives another nucleus.

filter_logits applies: repetition penalty, temperature, top-k, top-p. Every expected value below is worked out by
hand in the comments (exp, sums, cumulative masses), not taken from the code.
"""

from __future__ import annotations

import math

import pytest
import torch

from lumina_ds.generation.sampling import SamplingConfig, filter_logits


def _kept(filtered: torch.Tensor) -> list[int]:
    return torch.isfinite(filtered[0]).nonzero().flatten().tolist()


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0]])  # [1, V]


def test_temperature_below_one_is_applied_before_top_p() -> None:
    # T=0.5: logits/T = [4, 2, 0, -2]; exp = [54.60, 7.389, 1, 0.1353], sum 63.12
    # -> probs [0.8650, 0.1171, 0.0158, 0.0021]; mass ranked above each: [0, 0.8650, 0.9821, 0.9979]
    # -> top_p=0.9 keeps {0, 1}.
    # Top-p on the raw logits instead: exp [7.389, 2.718, 1, 0.3679], sum 11.475 -> probs [0.6439, 0.2369, 0.0871,
    # 0.0321]; masses above [0, 0.6439, 0.8808, 0.9679] -> it would keep {0, 1, 2}.
    cfg = SamplingConfig(temperature=0.5, top_p=0.9, top_k=0)
    filtered = filter_logits(LOGITS, cfg)
    assert _kept(filtered) == [0, 1]
    assert filtered[0, :2].tolist() == [4.0, 2.0]  # the survivors carry the tempered logits
    # sampled over the survivors: softmax([4, 2]) = [sigmoid(2), 1 - sigmoid(2)]
    probs = filtered.softmax(dim=-1)[0]
    assert probs.tolist() == pytest.approx([_sigmoid(2.0), 1 - _sigmoid(2.0), 0.0, 0.0], abs=1e-6)


def test_temperature_above_one_is_applied_before_top_p() -> None:
    # T=2: logits/T = [1, 0.5, 0, -0.5]; exp = [2.718, 1.6487, 1, 0.6065], sum 5.9733
    # -> probs [0.4551, 0.2760, 0.1674, 0.1015]; masses above [0, 0.4551, 0.7311, 0.8985] -> top_p=0.85 keeps {0,1,2}.
    # On the raw logits the masses above are [0, 0.6439, 0.8808, ...] -> it would keep only {0, 1}.
    cfg = SamplingConfig(temperature=2.0, top_p=0.85, top_k=0)
    filtered = filter_logits(LOGITS, cfg)
    assert _kept(filtered) == [0, 1, 2]
    # renormalised over {0, 1, 2}: exp [2.718, 1.6487, 1] / 5.3670
    probs = filtered.softmax(dim=-1)[0]
    assert probs.tolist() == pytest.approx([0.50648, 0.30719, 0.18633, 0.0], abs=1e-4)


def test_repetition_penalty_is_applied_before_temperature_and_top_p() -> None:
    # logits [3, 1, 0.5, -1], token 0 already generated, penalty 2, T=0.5, top_p=0.8.
    # Penalty first: 3 / 2 = 1.5 -> [1.5, 1, 0.5, -1]; / T -> [3, 2, 1, -2]; exp [20.09, 7.389, 2.718, 0.1353],
    # sum 30.33 -> probs [0.6623, 0.2436, 0.0896, 0.0045]; masses above [0, 0.6623, 0.9059, ...] -> keeps {0, 1}.
    # Penalty after the filters: the nucleus of [6, 2, 1, -2] has probs [0.9748, 0.0179, ...] -> masses above
    # [0, 0.9748, ...] -> it would keep {0} alone, and greedy-like sampling would repeat token 0 forever.
    logits = torch.tensor([[3.0, 1.0, 0.5, -1.0]])
    cfg = SamplingConfig(temperature=0.5, top_p=0.8, top_k=0, repetition_penalty=2.0)
    filtered = filter_logits(logits, cfg, prev_ids=torch.tensor([[0]]))
    assert _kept(filtered) == [0, 1]
    assert filtered[0, :2].tolist() == [3.0, 2.0]
    probs = filtered.softmax(dim=-1)[0]
    assert probs.tolist() == pytest.approx([_sigmoid(1.0), 1 - _sigmoid(1.0), 0.0, 0.0], abs=1e-6)


def test_repetition_penalty_divides_the_raw_logit_whatever_its_sign() -> None:
    # The CTRL penalty looks at the sign of the raw logit: 2 -> 2/4 = 0.5, -1 -> -1*4 = -4; then T=0.5 doubles
    # everything: [1, 2, 0, -8]. Applied after the temperature the values agree (both are scalings by positive
    # factors), so the pin that matters is the one above, against the filters; this one pins the arithmetic.
    cfg = SamplingConfig(temperature=0.5, top_p=1.0, top_k=0, repetition_penalty=4.0)
    filtered = filter_logits(LOGITS, cfg, prev_ids=torch.tensor([[0, 3, 3]]))  # a repeated id is penalised once
    assert filtered[0].tolist() == [1.0, 2.0, 0.0, -8.0]


def test_top_k_then_top_p_on_tempered_logits() -> None:
    # top_k=3 drops token 3; T=0.5 -> [4, 2, 0] -> probs [0.8668, 0.1173, 0.0159] -> top_p=0.95: masses above
    # [0, 0.8668, 0.9841] -> keeps {0, 1}. On raw logits (after top-k) probs [0.6652, 0.2447, 0.0900], masses
    # above [0, 0.6652, 0.9100] -> it would keep {0, 1, 2}.
    cfg = SamplingConfig(temperature=0.5, top_p=0.95, top_k=3)
    assert _kept(filter_logits(LOGITS, cfg)) == [0, 1]
