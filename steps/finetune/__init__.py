"""finetune: training with TempBalance layer-wise learning rates, LoRA and AlphaLoRA experts."""
