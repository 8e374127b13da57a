"""Sizes the engine works in, kept apart from the engine so the memory estimator can price them
without importing torch."""

CHUNK = 1 << 22          # values per z draw in dense passes (16 MiB of float32): DenseTrainable
# Bytes per value beside z when drawing Rademacher signs: the uint8 -> int64 table index (1 byte per
# value: one int64 per 8 values) and the random 64-bit words (1/8 byte per value). zo.directions.draw
RADEMACHER_EXTRA_BYTES = 1 + 1 / 8
OPT_STATE_VALUES = {"sgd": 0, "momentum": 1, "adam": 2}  # state values kept per trainable value
# Values per step of the fused passes' torch fallback (zo.philox), whose temporaries peak at ~58 bytes a value
# for Gaussian z (float64 Box-Muller), ~5 for Rademacher (measured on CPU): 15 MiB at most on a CPU, below
# the z chunk it replaces. On a GPU each step costs ~130 kernel launches (Philox's rounds as tensor ops),
# so steps there are larger (116 MiB at most).
PHILOX_CHUNK = 1 << 18
PHILOX_CHUNK_GPU = 1 << 21
# The global top-k of a mask (zo.masks.topk_mask): score values read at a time (bounded temporaries), and a
# candidate's key, its tensor number shifted left by TOPK_KEY_SHIFT or'ed with its flat index in the tensor.
TOPK_CHUNK = 1 << 22
TOPK_KEY_SHIFT = 40
