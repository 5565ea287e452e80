"""Plain torch modules and the model's own config: no DeepSpeed, no torch.distributed (parallelism is applied from
lumina_ds.distributed). `models.config` imports no torch, so a light command can read a config without it."""
