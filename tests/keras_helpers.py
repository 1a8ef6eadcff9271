"""Shared by test_keras.py and test_tf.py, which import it after selecting the TensorFlow backend
(tests/conftest.py puts this directory on sys.path)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

import shardfeed

assert keras.backend.backend() == "tensorflow", keras.backend.backend()
tf.get_logger().setLevel("ERROR")


def write_dataset(path: str, n: int, *, features: int = 6, seed: int = 0, shard_size: int = 16 << 10) -> dict:
    """A regression/classification dataset: x float16[features], image uint8[2, 3, 3], id (the
    sample's index), tag (= id, float32), label (0-9), target (a noisy linear function of x),
    weight (in [0.5, 1.5]). Returns the columns as written."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(np.float16)
    true_w = np.linspace(-1, 1, features).astype(np.float32)
    columns = {
        "x": x,
        "image": rng.integers(0, 256, (n, 2, 3, 3), dtype=np.uint8),
        "id": np.arange(n, dtype=np.int64),
        "tag": np.arange(n, dtype=np.float32),
        "label": rng.integers(0, 10, n).astype(np.int64),
        "target": (x.astype(np.float32) @ true_w + 0.3 + 0.01 * rng.standard_normal(n)).astype(np.float32),
        "weight": (0.5 + rng.random(n)).astype(np.float32),
    }
    fields = {"x": ("float16", (features,)), "image": ("uint8", (2, 3, 3)), "id": ("int64", ()),
              "tag": ("float32", ()), "label": ("int64", ()), "target": ("float32", ()), "weight": ("float32", ())}
    with shardfeed.Writer(path, fields=fields, shard_size=shard_size) as writer:
        writer.extend(columns)
    columns["true_w"] = true_w
    return columns


class Recorder(keras.layers.Layer):
    """Identity on a batch of sample tags (float32, shape (batch,)); in training it writes the
    tags of step k into row k of ``log`` (rows start at -1), so a test can read back exactly
    which samples the model saw at each step, after the fact, from the model's own state."""

    def __init__(self, steps: int, batch_size: int, **kwargs):
        super().__init__(**kwargs)
        self.steps, self.batch_size = steps, batch_size

    def build(self, input_shape):
        self.log = self.add_weight(name="log", shape=(self.steps, self.batch_size), trainable=False,
                                   initializer=keras.initializers.Constant(-1.0))
        self.count = self.add_weight(name="count", shape=(), trainable=False, initializer="zeros",
                                     dtype="int32")

    def call(self, tags, training=False):
        tags = tf.reshape(tags, (-1,))
        if training:
            padded = tf.pad(tags, [[0, self.batch_size - tf.shape(tags)[0]]], constant_values=-1.0)
            self.log.assign(tf.tensor_scatter_nd_update(self.log.value, [[self.count.value]], padded[None, :]))
            self.count.assign_add(1)
        return tags

    def seen(self) -> list:
        """Tags seen per step (rows of the steps trained so far, padding dropped)."""
        log = self.log.numpy()[:int(self.count.numpy())]
        return [row[row >= 0].astype(np.int64) for row in log]


def mlp(features: int, steps: int, batch_size: int, seed: int = 0, trainable: bool = True, optimizer: str = "sgd"):
    """A small MLP on inputs {"x", "tag"} -> one output, with a Recorder on "tag". The recorder adds
    exactly zero to the output, so the numbers are those of the plain MLP."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((features,), name="x")
    tag = keras.Input((), name="tag")
    recorder = Recorder(steps, batch_size, name="recorder")
    hidden = keras.layers.Dense(8, activation="relu", trainable=trainable)(x)
    out = keras.layers.Dense(1, trainable=trainable)(hidden)
    out = keras.layers.Reshape(())(out)
    out = out + 0.0 * recorder(tag)
    model = keras.Model({"x": x, "tag": tag}, out)
    opt = keras.optimizers.SGD(0.05) if optimizer == "sgd" else keras.optimizers.Adam(0.01)
    model.compile(optimizer=opt, loss="mse")
    return model


def weights(model) -> list:
    return [np.array(w) for w in model.get_weights()]


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)
