"""The builtin backward passes (``tf.custom_gradient``) against TensorFlow's own gradients of the same forward op:
each op's value and gradients agree to float32 precision, on shapes with odd sizes, strides and padding."""

import numpy as np
import pytest

from edgekit import _tf
from edgekit.trainable import _grad_ops as ops

RNG = np.random.default_rng(0)
X = RNG.normal(size=(2, 7, 6, 3)).astype(np.float32)
PADS = ((1, 1), (0, 1))


def _pad(tf, x, pads=PADS, value=0.0):
    return tf.pad(x, [[0, 0], list(pads[0]), list(pads[1]), [0, 0]], constant_values=value)


def _cases():
    """name -> (edgekit's op, TensorFlow's reference, the inputs); the reference is differentiated by TensorFlow."""
    w = RNG.normal(size=(3, 2, 3, 4)).astype(np.float32)
    dw = RNG.normal(size=(3, 3, 3, 1)).astype(np.float32)
    b = RNG.normal(size=(2, 1, 1, 3)).astype(np.float32)
    logits, weights = RNG.normal(size=(5, 4)).astype(np.float32), np.array([1, 2, 0, 1, 1], np.float32)
    onehot = np.eye(4, dtype=np.float32)[[0, 3, 1, 2, 2]]
    table, ids = RNG.normal(size=(6, 3)).astype(np.float32), np.array([[0, 5, 5], [2, 0, 1]], np.int32)
    return {
        "conv2d": (lambda tf, x, w: ops.conv2d(x, w, (2, 1), PADS),
                   lambda tf, x, w: tf.nn.conv2d(_pad(tf, x), w, [1, 2, 1, 1], "VALID"), (X, w)),
        "depthwise_conv2d": (lambda tf, x, w: ops.depthwise_conv2d(x, w, (2, 2), PADS),
                             lambda tf, x, w: tf.nn.depthwise_conv2d(_pad(tf, x), w, [1, 2, 2, 1], "VALID"), (X, dw)),
        "max_pool": (lambda tf, x: ops.max_pool(x, (2, 2), (2, 2), ((0, 1), (0, 0))),
                     lambda tf, x: tf.nn.max_pool2d(_pad(tf, x, ((0, 1), (0, 0)), -3.0e38), 2, 2, "VALID"), (X,)),
        "avg_pool": (lambda tf, x: ops.avg_pool(x, (3, 2), (2, 2)),
                     lambda tf, x: tf.nn.avg_pool2d(x, [3, 2], [2, 2], "VALID"), (X,)),
        "relu6": (lambda tf, x: ops.relu(x, 6.0), lambda tf, x: tf.nn.relu6(x), (X * 4,)),
        "sigmoid": (lambda tf, x: ops.sigmoid(x), lambda tf, x: tf.sigmoid(x), (X,)),
        "tanh": (lambda tf, x: ops.tanh(x), lambda tf, x: tf.tanh(x), (X,)),
        "leaky_relu": (lambda tf, x: ops.leaky_relu(x, 0.2), lambda tf, x: tf.nn.leaky_relu(x, 0.2), (X,)),
        "clip": (lambda tf, x: ops.clip(x, -0.5, 0.7), lambda tf, x: tf.clip_by_value(x, -0.5, 0.7), (X,)),
        "zero_pad": (lambda tf, x: ops.zero_pad(x, PADS), lambda tf, x: _pad(tf, x), (X,)),
        "global_max_pool": (lambda tf, x: ops.global_max_pool(x, keepdims=True),
                            lambda tf, x: tf.reduce_max(x, axis=[1, 2], keepdims=True), (X,)),
        "multiply": (lambda tf, a, b: ops.multiply(a, b), lambda tf, a, b: a * b, (X, b)),
        "embedding": (lambda tf, t: ops.embedding(ids, t), lambda tf, t: tf.gather(t, ids), (table,)),
        "cross_entropy": (lambda tf, z: ops.cross_entropy(z, onehot, weights),
                          lambda tf, z: tf.reduce_sum(weights * tf.nn.softmax_cross_entropy_with_logits(onehot, z))
                          / tf.reduce_sum(weights), (logits,)),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_builtin_gradient_matches_tensorflows(name):
    tf = _tf.tf()
    mine, reference, inputs = CASES[name]
    results = []
    for op in (mine, reference):
        tensors = [tf.constant(v) for v in inputs]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            y = op(tf, *tensors)
            # a fixed random cotangent: every output position weighs differently
            loss = tf.reduce_sum(y * tf.constant(np.random.default_rng(1).normal(size=y.shape).astype(np.float32)))
        results.append((y.numpy(), [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, tensors)]))
    (y, grads), (y_ref, grads_ref) = results
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_every_gradient_op_is_checked():
    public = {n for n in vars(ops) if not n.startswith("_") and callable(getattr(ops, n))
              and getattr(getattr(ops, n), "__module__", "") == ops.__name__}
    checked = {name.replace("relu6", "relu") for name in CASES}
    helpers = {"same_padding", "as_2d", "from_2d"}  # shape helpers, not differentiated ops
    assert public - helpers == checked, sorted(public - helpers - checked)


def test_one_parity_rule_for_a_train_step():
    """A step is TensorFlow's when each tensor is within 1e-5, or its difference is within 1% of the step (L2):
    float32 summation order passes, a wrong gradient does not (the rule the export and benchmarks/agent.py use)."""
    from edgekit.trainable.export import PARITY_RTOL, step_parity

    before = {"a": np.zeros(100, np.float32), "b": np.zeros(10, np.float32)}
    want = {"a": np.full(100, 5.0, np.float32), "b": np.full(10, 0.1, np.float32)}
    reordered = {"a": want["a"] + 1.04e-5, "b": want["b"]}  # past 1e-5, a tiny share of a large step
    parity = step_parity(before, reordered, want)
    assert parity.ok and parity.worst == "a" and parity.worst_relative < PARITY_RTOL
    wrong = {"a": want["a"], "b": want["b"] * 1.3}  # a gradient off by 30%
    parity = step_parity(before, wrong, want)
    assert not parity.ok and parity.worst == "b" and abs(parity.worst_relative - 0.3) < 1e-3
    assert parity.max_abs_diff == pytest.approx(0.03, rel=1e-3)
