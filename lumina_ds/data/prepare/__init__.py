"""From records to token documents: the batched encoder, tokenizing in worker processes into RAM or cached shards, and
the token counts of sources read on demand."""
