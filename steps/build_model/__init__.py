"""build_model: materialise a named model (tiny random or packaged pretrained) as an HF dir."""
