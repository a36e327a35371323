"""Depth probe: how much metric depth a frozen model's visual tokens carry (Spatial Forcing's Fig. 3).

A DPT head is trained from scratch on 4 token layers of a frozen model and tested on held-out episodes
against ground-truth depth, next to the mean-depth-image baseline; `sf probe` does this for an `sf train`
checkpoint (and its patch-embedding control). For your own VLA (OpenVLA-OFT, pi0), dump the hidden states
of 4 layers at the visual token positions and call `probe`:

    out = vla(**inputs, output_hidden_states=True)              # HF models: one tensor per layer
    layers = [out.hidden_states[i] for i in (21, 22, 23, 24)]    # SF-aligned layer 24 and the 3 before it
    tokens = torch.stack(layers, 1)[:, :, first:first + V * 256]  # the visual positions: [B, 4, V*h*w, dim]
    data = ArrayData(tokens_all, depth_all, episode_ids)        # depth [N, V, H, W] metres, cropped as the VLA saw
    report = probe(data, "probe_out", FitSettings(steps=2000))

Many GB of hidden states go into an sfcache store instead (`write_token_store`, resumable) and are read back
with `StoreData(store, depth=SourceRows(source, cache.index, size, box).depth)`.
"""

from sfcache.probe.data import ArrayData, ProbeData, SourceRows, StoreData, write_token_store
from sfcache.probe.fit import MEAN_DEPTH, FitSettings, evaluate, probe, split_episodes
from sfcache.probe.head import DPTHead
from sfcache.probe.metrics import DepthMetrics, valid_pixels

__all__ = [
    "MEAN_DEPTH",
    "ArrayData",
    "DPTHead",
    "DepthMetrics",
    "FitSettings",
    "ProbeData",
    "SourceRows",
    "StoreData",
    "evaluate",
    "probe",
    "split_episodes",
    "valid_pixels",
    "write_token_store",
]
