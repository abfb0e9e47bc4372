"""Forward ops whose backward pass is written in TFLite builtin ops (``tf.custom_gradient``).

TensorFlow's own gradients of conv, depthwise conv, ReLU, pooling and softmax cross-entropy
(Conv2DBackpropFilter, ReluGrad, MaxPoolGrad, ...) are not TFLite builtins. Each gradient here is
built from strided slices, matmuls, multiplies, pads and reshapes, which are. All shapes are
static (the train signature has a fixed batch size).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgekit import _tf


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'same' padding (before, after) along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _window(xp: Any, i: int, j: int, out_h: int, out_w: int, sh: int, sw: int) -> Any:
    """The input values that window offset (i, j) sees for every output position."""
    return xp[:, i:i + (out_h - 1) * sh + 1:sh, j:j + (out_w - 1) * sw + 1:sw, :]


def _place(t: Any, i: int, j: int, sh: int, sw: int, padded_h: int, padded_w: int) -> Any:
    """Scatter ``t`` (n, oh, ow, c) to rows i + k*sh and columns j + l*sw of a zero (n, H, W, c)."""
    tf = _tf.tf()
    n, oh, ow, c = t.shape
    if sw > 1:
        zeros = tf.zeros_like(t)
        t = tf.reshape(tf.stack([t] + [zeros] * (sw - 1), axis=3), [n, oh, ow * sw, c])[:, :, :(ow - 1) * sw + 1, :]
    if sh > 1:
        zeros = tf.zeros_like(t)
        t = tf.reshape(tf.stack([t] + [zeros] * (sh - 1), axis=2), [n, oh * sh, t.shape[2], c])[:, :(oh - 1) * sh + 1]
    return tf.pad(t, [[0, 0], [i, padded_h - i - t.shape[1]], [j, padded_w - j - t.shape[2]], [0, 0]])


def relu(x: Any, max_value: float | None = None) -> Any:
    tf = _tf.tf()

    @tf.custom_gradient
    def f(x: Any) -> Any:
        y = tf.nn.relu(x) if max_value is None else tf.minimum(tf.nn.relu(x), max_value)

        def grad(g: Any) -> Any:
            mask = tf.cast(x > 0, x.dtype)
            if max_value is not None:
                mask = mask * tf.cast(x < max_value, x.dtype)
            return g * mask

        return y, grad

    return f(x)


def _padded(x: Any, w: Any, pads: tuple[tuple[int, int], tuple[int, int]], forward: Callable[[Any, Any], Any],
            backward: Callable[[Any, Any, Any], tuple[Any, Any]]) -> Any:
    """A VALID op over the explicitly padded input with a hand-written backward pass.

    ``backward(xp, w, g)`` returns the gradients of the padded input and of the kernel; the
    padding is cut off the input gradient here.
    """
    tf = _tf.tf()
    (pt, pb), (pl, pr) = pads

    @tf.custom_gradient
    def f(x: Any, w: Any) -> Any:
        xp = tf.pad(x, [[0, 0], [pt, pb], [pl, pr], [0, 0]])

        def grad(g: Any) -> Any:
            dxp, dw = backward(xp, w, g)
            return dxp[:, pt:pt + x.shape[1], pl:pl + x.shape[2], :], dw

        return forward(xp, w), grad

    return f(x, w)


def conv2d(x: Any, w: Any, strides: tuple[int, int], pads: tuple[tuple[int, int], tuple[int, int]]) -> Any:
    """Convolution. Kernel gradient: one im2col matmul (windows concatenated along channels);
    input gradient: TRANSPOSE_CONV of the output gradient (a builtin)."""
    tf = _tf.tf()
    sh, sw = strides

    def backward(xp: Any, w: Any, g: Any) -> tuple[Any, Any]:
        kh, kw, cin, cout = w.shape
        n, oh, ow, _ = g.shape
        windows = [_window(xp, i, j, oh, ow, sh, sw) for i in range(kh) for j in range(kw)]
        patches = tf.reshape(tf.concat(windows, axis=-1), [-1, kh * kw * cin])
        dw = tf.reshape(tf.matmul(tf.transpose(patches), tf.reshape(g, [-1, cout])), [kh, kw, cin, cout])
        dxp = tf.nn.conv2d_transpose(g, w, output_shape=[n, xp.shape[1], xp.shape[2], cin],
                                     strides=[1, sh, sw, 1], padding="VALID")
        return dxp, dw

    return _padded(x, w, pads, lambda xp, w: tf.nn.conv2d(xp, w, strides=[1, sh, sw, 1], padding="VALID"),
                   backward)


def depthwise_conv2d(x: Any, w: Any, strides: tuple[int, int], pads: tuple[tuple[int, int], tuple[int, int]]) -> Any:
    """Depthwise convolution (depth multiplier 1); per kernel offset, multiplies and sums."""
    tf = _tf.tf()
    sh, sw = strides

    def backward(xp: Any, w: Any, g: Any) -> tuple[Any, Any]:
        kh, kw, c, _ = w.shape
        oh, ow = g.shape[1], g.shape[2]
        dws, dxp = [], None
        for i in range(kh):
            for j in range(kw):
                dws.append(tf.reduce_sum(_window(xp, i, j, oh, ow, sh, sw) * g, axis=[0, 1, 2]))
                placed = _place(g * tf.reshape(w[i, j, :, 0], [1, 1, 1, c]), i, j, sh, sw, xp.shape[1], xp.shape[2])
                dxp = placed if dxp is None else dxp + placed
        return dxp, tf.reshape(tf.stack(dws), w.shape)

    return _padded(x, w, pads,
                   lambda xp, w: tf.nn.depthwise_conv2d(xp, w, strides=[1, sh, sw, 1], padding="VALID"), backward)


def max_pool(x: Any, pool: tuple[int, int], strides: tuple[int, int],
             pads: tuple[tuple[int, int], tuple[int, int]]) -> Any:
    """Max pooling; the gradient goes to the first position equal to the window's maximum."""
    tf = _tf.tf()
    (ph, pw), (sh, sw) = pool, strides
    (pt, pb), (pl, pr) = pads

    @tf.custom_gradient
    def f(x: Any) -> Any:
        xp = tf.pad(x, [[0, 0], [pt, pb], [pl, pr], [0, 0]], constant_values=-3.0e38) if pt + pb + pl + pr else x
        y = tf.nn.max_pool2d(xp, [ph, pw], [sh, sw], "VALID")

        def grad(g: Any) -> Any:
            n, oh, ow, c = g.shape
            hp, wp = xp.shape[1], xp.shape[2]
            dxp, taken = None, tf.zeros_like(g)
            for i in range(ph):  # like MaxPoolGrad: only the first maximum of a window (scan order) gets it
                for j in range(pw):
                    mask = tf.cast(tf.equal(_window(xp, i, j, oh, ow, sh, sw), y), g.dtype) * (1.0 - taken)
                    taken = taken + mask
                    placed = _place(g * mask, i, j, sh, sw, hp, wp)
                    dxp = placed if dxp is None else dxp + placed
            return dxp[:, pt:pt + x.shape[1], pl:pl + x.shape[2], :]

        return y, grad

    return f(x)


def avg_pool(x: Any, pool: tuple[int, int], strides: tuple[int, int]) -> Any:
    """Average pooling ('valid'); the gradient is spread evenly over each window."""
    tf = _tf.tf()
    (ph, pw), (sh, sw) = pool, strides

    @tf.custom_gradient
    def f(x: Any) -> Any:
        y = tf.nn.avg_pool2d(x, [ph, pw], [sh, sw], "VALID")

        def grad(g: Any) -> Any:
            n, oh, ow, c = g.shape
            share = g / float(ph * pw)
            dx = None
            for i in range(ph):
                for j in range(pw):
                    placed = _place(share, i, j, sh, sw, x.shape[1], x.shape[2])
                    dx = placed if dx is None else dx + placed
            return dx

        return y, grad

    return f(x)


def cross_entropy(logits: Any, onehot: Any, weights: Any) -> Any:
    """Weighted mean of -sum(onehot * log_softmax(logits)); gradient (softmax - onehot) * w / sum(w)."""
    tf = _tf.tf()

    @tf.custom_gradient
    def f(logits: Any) -> Any:
        logp = tf.nn.log_softmax(logits)
        total = tf.maximum(tf.reduce_sum(weights), 1e-12)
        loss = tf.reduce_sum(-tf.reduce_sum(onehot * logp, axis=1) * weights) / total

        def grad(g: Any) -> Any:
            return g * (tf.exp(logp) - onehot) * tf.reshape(weights / total, [-1, 1])

        return loss, grad

    return f(logits)


def _with_output_gradient(forward: Callable[[Any], Any], slope: Callable[[Any], Any], x: Any) -> Any:
    """``forward(x)`` whose backward pass is ``g * slope(y)``, written from the output ``y``."""
    tf = _tf.tf()

    @tf.custom_gradient
    def f(x: Any) -> Any:
        y = forward(x)
        return y, lambda g: g * slope(y)

    return f(x)


def sigmoid(x: Any) -> Any:
    """Sigmoid; gradient y * (1 - y) (TensorFlow's SigmoidGrad is not a builtin)."""
    return _with_output_gradient(_tf.tf().sigmoid, lambda y: y * (1.0 - y), x)


def tanh(x: Any) -> Any:
    """Tanh; gradient 1 - y^2 (TanhGrad is not a builtin)."""
    return _with_output_gradient(_tf.tf().tanh, lambda y: 1.0 - y * y, x)


def leaky_relu(x: Any, alpha: float) -> Any:
    """Leaky ReLU; gradient 1 or ``alpha`` (LeakyReluGrad is not a builtin)."""
    tf = _tf.tf()

    @tf.custom_gradient
    def f(x: Any) -> Any:
        positive = tf.cast(x > 0, x.dtype)
        return tf.nn.leaky_relu(x, alpha=alpha), lambda g: g * (positive + alpha * (1.0 - positive))

    return f(x)


def clip(x: Any, low: float, high: float) -> Any:
    """Clip to [low, high]; gradient 1 inside, 0 outside."""
    tf = _tf.tf()

    @tf.custom_gradient
    def f(x: Any) -> Any:
        inside = tf.cast(x > low, x.dtype) * tf.cast(x < high, x.dtype)
        return tf.clip_by_value(x, low, high), lambda g: g * inside

    return f(x)


def zero_pad(x: Any, pads: tuple[tuple[int, int], tuple[int, int]]) -> Any:
    """Zero padding of height and width; the gradient is the slice of the inside."""
    tf = _tf.tf()
    (pt, pb), (pl, pr) = pads

    @tf.custom_gradient
    def f(x: Any) -> Any:
        y = tf.pad(x, [[0, 0], [pt, pb], [pl, pr], [0, 0]])
        return y, lambda g: g[:, pt:pt + x.shape[1], pl:pl + x.shape[2], :]

    return f(x)


def global_max_pool(x: Any, *, keepdims: bool) -> Any:
    """Max over height and width; the gradient goes to every position equal to the maximum."""
    tf = _tf.tf()

    @tf.custom_gradient
    def f(x: Any) -> Any:
        top = tf.reduce_max(x, axis=[1, 2], keepdims=True)

        def grad(g: Any) -> Any:
            mask = tf.cast(tf.equal(x, top), x.dtype)
            return mask * tf.reshape(g, [-1, 1, 1, g.shape[-1]]) / tf.reduce_sum(mask, [1, 2], keepdims=True)

        return (top if keepdims else tf.reshape(top, [-1, x.shape[-1]])), grad

    return f(x)


def multiply(a: Any, b: Any) -> Any:
    """Elementwise product with broadcasting (squeeze-excite: (n, 1, 1, c) * (n, h, w, c)); each gradient is summed
    over the axes its input was broadcast along (static shapes: no BroadcastGradientArgs op)."""
    tf = _tf.tf()

    def reduce_to(g: Any, shape: Any) -> Any:
        axes = [i for i, (have, want) in enumerate(zip(g.shape, shape)) if want == 1 and have != 1]
        return tf.reduce_sum(g, axis=axes, keepdims=True) if axes else g

    @tf.custom_gradient
    def f(a: Any, b: Any) -> Any:
        return a * b, lambda g: (reduce_to(g * b, a.shape), reduce_to(g * a, b.shape))

    return f(a, b)


def embedding(ids: Any, table: Any) -> Any:
    """Rows of ``table`` for integer ``ids``; the table's gradient is a scatter-add of the output gradient
    (UNSORTED_SEGMENT_SUM, a builtin), dense, so a plain SGD step updates it."""
    tf = _tf.tf()
    vocab, width = int(table.shape[0]), int(table.shape[1])
    flat = tf.reshape(tf.clip_by_value(ids, 0, vocab - 1), [-1])  # Keras raises on out-of-range ids; a device clips

    @tf.custom_gradient
    def f(table: Any) -> Any:
        y = tf.reshape(tf.gather(table, flat), tf.concat([tf.shape(ids), [width]], 0))
        return y, lambda g: tf.math.unsorted_segment_sum(tf.reshape(g, [-1, width]), flat, vocab)

    return f(table)


def as_2d(x: Any) -> Any:
    """A sequence ``[B, T, C]`` as a one-row image ``[B, 1, T, C]`` (1D layers reuse the 2D gradients)."""
    return _tf.tf().expand_dims(x, 1)


def from_2d(x: Any) -> Any:
    return _tf.tf().squeeze(x, [1])
