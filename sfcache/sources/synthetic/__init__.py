"""Write small datasets in each exact on-disk format, for tests, benchmarks, `make demo`.

No real dataset can be downloaded here, so these writers reproduce the layouts byte for byte where
it matters to a reader: keys, dtypes, attributes, file names, folder layout, JPEG/PNG encodings,
TFRecord framing with masked CRC32C, TFDS and LeRobot metadata, and the known quirks (upside-down
LIBERO frames, `liber_o10`, NUL-padded OpenCV-channel-order RoboTwin JPEGs, XPL-RGB1 markers).
Frames are rendered scenes (sky, table, a corner marker, an object that moves with the actions),
different per view, deterministic from the seed. Every writer returns `Written`: the path to open
and, per episode key, what a reader must return (frames as the policy sees them).
"""

from sfcache.sources.synthetic.lerobot import write_lerobot
from sfcache.sources.synthetic.libero import write_demo_dataset, write_libero_hdf5, write_libero_rlds
from sfcache.sources.synthetic.robotwin import write_robotwin
from sfcache.sources.synthetic.scenes import ExpectedEpisode, Written, render_depth, render_episode, render_view

__all__ = [
    "ExpectedEpisode",
    "Written",
    "render_depth",
    "render_episode",
    "render_view",
    "write_demo_dataset",
    "write_lerobot",
    "write_libero_hdf5",
    "write_libero_rlds",
    "write_robotwin",
]
