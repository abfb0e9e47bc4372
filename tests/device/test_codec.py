"""Update codecs (device_agents.federated.codec): int8 and int4 deltas, their error and their packing."""

import numpy as np

from device_agents.federated import codec


def test_codec_round_trip_error_is_bounded():
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((64, 32)).astype(np.float32), "b": np.zeros(32, np.float32)}
    new = {k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.01 for k, v in base.items()}
    deltas, scales = codec.encode(new, base)
    assert all(d.dtype == np.int8 for d in deltas.values())
    back = codec.decode(deltas, scales, base)
    for k in base:
        assert np.max(np.abs(back[k] - new[k])) <= scales[k] / 2 + 1e-7
    assert sum(d.nbytes for d in deltas.values()) * 4 == sum(v.nbytes for v in new.values())


def test_int4_codec_is_unbiased_keeps_its_rounding_error_and_packs_two_levels_a_byte():
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((3, 3, 16, 32)).astype(np.float32), "b": np.zeros(33, np.float32)}
    new = {k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.01 for k, v in base.items()}
    packed, scales, left = codec.encode_int4(new, base, {}, rng)
    # 4641 values -> 2321 bytes; blocks: 36 of "w" + 1 of "b" (a block never mixes tensors)
    assert (packed.size, scales.size) == codec.int4_sizes({k: v.shape for k, v in base.items()}) == (2321, 37)
    assert packed.dtype == np.uint8 and scales.dtype == np.float32
    back = codec.decode_int4(packed, scales, base)
    for k in base:  # what was sent plus what the device kept is exactly the update
        assert np.allclose(back[k] + left[k].reshape(base[k].shape), new[k], atol=1e-6)
        assert np.max(np.abs(left[k])) <= np.max(scales) + 1e-7  # stochastic rounding: under one level
    assert sum(v.nbytes for v in new.values()) / (packed.nbytes + scales.nbytes) >= 7.0
    # unbiased: the mean of many encodings is the update (error feedback off)
    mean = np.mean([codec.decode_int4(*codec.encode_int4(new, base, {}, rng)[:2], base)["w"] for _ in range(400)], 0)
    assert np.max(np.abs(mean - new["w"])) < 0.1 * np.max(np.abs(new["w"] - base["w"]))
    # error feedback: the kept error is added to the next update
    again, scales2, left2 = codec.encode_int4(base, base, left, rng)  # no new training: only the carried error
    carried = codec.decode_int4(again, scales2, base)["w"] - base["w"] + left2["w"].reshape(base["w"].shape)
    assert np.allclose(carried, left["w"].reshape(base["w"].shape), atol=1e-6)
