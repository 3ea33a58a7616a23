"""build_model: materialise a named model (tiny random or packaged pretrained) as an HF dir.

Takes: a model name and seed (no inputs).
Gives: a model (an HF safetensors directory, with its tokenizer when it has one).
Start reading: step.py; the models themselves are steps/core/factory.py and pretrained.py.
"""
