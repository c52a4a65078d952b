"""The two-digit task: canvases of two 8x8 digits side by side, steered toward a constraint on the pair.

A compositional reward (sum to 10, same digit, an ordered pair, left larger by >= 5) is where a sampler
has to know, early, which pair a noisy canvas is heading for: the benchmark where the look-ahead decides.
"""
