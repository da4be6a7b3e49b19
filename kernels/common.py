"""Constants shared by every kernel and by the model's attention."""

# The score of a masked position. Finite, so a fully masked row (padding) gives a uniform softmax
# instead of NaN, and online-softmax updates (s - m) never compute inf - inf.
NEG_INF = -1e30
