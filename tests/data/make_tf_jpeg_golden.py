"""Writes tests/data/tf_jpeg_golden.npz once (needs `pip install tensorflow-cpu`; not run by the suite).

JPEGs encoded by TensorFlow's own encoder (tf.io.encode_jpeg, quality 95) from smooth-plus-noise frames,
and TensorFlow's default decode of them (tf.io.decode_image, as OpenVLA-OFT's RLDS pipeline decodes).
"""

from pathlib import Path

import numpy as np
import tensorflow as tf


def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for height, width in ((128, 128), (48, 80)):
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        smooth = np.stack([128 + 100 * np.sin(x / 17 + c) * np.cos(y / 23 - c) for c in range(3)], axis=-1)
        out.append(np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8))
    return out


def main() -> None:
    jpegs = [tf.io.encode_jpeg(frame, quality=95).numpy() for frame in frames()]
    decoded = [tf.io.decode_image(data).numpy() for data in jpegs]
    arrays = {f"jpeg_{i}": np.frombuffer(data, np.uint8) for i, data in enumerate(jpegs)}
    arrays.update({f"tf_decoded_{i}": image for i, image in enumerate(decoded)})
    np.savez_compressed(Path(__file__).with_name("tf_jpeg_golden.npz"), tensorflow=np.array(tf.__version__), **arrays)


if __name__ == "__main__":
    main()
