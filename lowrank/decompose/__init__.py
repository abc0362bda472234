"""Pure tensor algorithms: torch tensors in, torch tensors out, no nn.Module.

Notation: a conv weight is ``W`` of shape ``[T, S, kh, kw]`` (T output, S input channels);
a matrix is ``[m, n]``.
"""
