#!/usr/bin/env python3
"""Exports the 8x8 handwritten digits that scikit-learn ships (UCI ML hand-written digits,
1797 images, 16 grey levels) to digits.safetensors beside this file, once: the training
example reads it from there, so running it needs neither Python nor scikit-learn.

usage: python examples/data/export_digits.py   (needs scikit-learn, numpy, safetensors)
"""
import os

import numpy as np
from safetensors.numpy import save_file
from sklearn.datasets import load_digits

d = load_digits()
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.safetensors")
save_file({
    "pixels": d.data.astype(np.uint8),   # [1797, 64], values 0..16
    "labels": d.target.astype(np.uint8),  # [1797], digits 0..9
}, out, metadata={"source": "sklearn.datasets.load_digits (UCI ML hand-written digits)"})
print("wrote", out, d.data.shape)
