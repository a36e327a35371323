"""Every Python snippet of README.md and docs/*.md runs as written, so the docs cannot drift from the API.

Each ```python block (also ```py) runs by default, in a fresh namespace, in a working folder that holds what
the docs name: `data/libero_spatial` (LIBERO HDF5), `stores/spatial` (extracted from it with `random:tiny`),
`data/aloha` (LeRobot) and `stores/aloha` (its `--recipe openpi` store), all written here with
`sfcache/sources/synthetic/` and the real extractor. A new block therefore runs without any change here.

A block needing more than that says so in an HTML comment on the last non-blank line above its fence
(invisible on GitHub), one of:

    <!-- snippet: context: NAME -->     names from your own program (a model, a dataloader), CONTEXTS[NAME]
    <!-- snippet: skip: REASON -->      not run, with the reason (a GPU, a cluster, a library not installed)
    <!-- snippets: skip: REASON -->     (anywhere in a section) every block up to the next heading of its level

Skipped blocks still have their `from sfcache... import ...` names checked. A context provides only the user's
own objects, as tiny real torch objects; what sfcache does in the block always runs for real. An indented
(unfenced) code block that parses as Python fails: fence it as ```python so it runs.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = {"python", "py", "python3"}
MARKER = re.compile(r"<!--\s*snippet:\s*(context|skip):\s*(.*?)\s*-->")
SECTION_MARKER = re.compile(r"<!--\s*snippets:\s*skip:\s*(.*?)\s*-->")
HEADING = re.compile(r"^(#{1,6}) ")


@dataclass(frozen=True)
class Snippet:
    file: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    code: str
    context: str | None = None
    skip: str | None = None  # the reason

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _marker_above(lines: list[str], fence: int) -> str:
    """The last non-blank line above line index `fence`."""
    for line in reversed(lines[:fence]):
        if line.strip():
            return line.strip()
    return ""


def collect(path: Path) -> tuple[list[Snippet], list[str]]:
    """The Python blocks of one Markdown file, and the problems found reading it (unfenced Python, bad markers)."""
    text = path.read_text()
    lines = text.splitlines()
    name = str(path.relative_to(ROOT))
    snippets, problems = [], []
    level, section_skip = 7, None  # a `snippets: skip` marker holds until a heading of its section's level or above
    current = 7
    for token in MarkdownIt("commonmark").parse(text):
        if token.type == "heading_open":
            current = int(token.tag[1])
            if current <= level:
                level, section_skip = 7, None
        elif token.type == "html_block" and (found := SECTION_MARKER.search(token.content)):
            level, section_skip = current, found[1]
        elif token.type == "code_block":
            try:
                ast.parse(token.content)
            except SyntaxError:
                continue  # shell commands, file trees, output
            problems.append(f"{name}:{token.map[0] + 1}: an indented block of Python; fence it as ```python so it runs")
        elif token.type == "fence" and token.info.split()[:1] in ([p] for p in PYTHON):
            first = token.map[0]
            above = _marker_above(lines, first)
            context = skip = None
            if found := MARKER.fullmatch(above):
                if found[1] == "context":
                    context = found[2]
                    if context not in CONTEXTS:
                        problems.append(f"{name}:{first + 1}: unknown snippet context {context!r}: {sorted(CONTEXTS)}")
                else:
                    skip = found[2] or None
                    if skip is None:
                        problems.append(f"{name}:{first + 1}: `snippet: skip:` needs a reason")
            elif above.startswith("<!--") and "snippet" in above and not SECTION_MARKER.fullmatch(above):
                problems.append(f"{name}:{first + 1}: snippet marker not understood: {above}")
            snippets.append(Snippet(name, first + 1, token.content, context, skip or section_skip))
    return snippets, problems


# ----------------------------------------------------------------------------- contexts: the user's own names


def _oft_trainer(cache_root: Path) -> dict:
    """An OpenVLA-OFT-style loop's own objects: a tiny "VLA" whose hidden states hold 2 + V*h*w (+ proprio)
    tokens of width 4096, its inputs and parameters, a DataLoader of episode keys / steps / lengths from the store."""
    from sfcache.store import open_cache

    cache = open_cache(cache_root / "stores" / "spatial")
    tokens = cache.provenance.targets.grid[0] * cache.provenance.targets.grid[1] * len(cache.views)
    proj = torch.nn.Linear(8, 4096)

    def vla(x, output_hidden_states):
        hidden = proj(x)
        return SimpleNamespace(hidden_states=(hidden,) * 33)

    keys = cache.episodes[:2]
    lengths = [cache.index.record(k).length for k in keys]
    batch = {"episode_key": keys, "step": torch.tensor([0, lengths[1] - 1]), "episode_length": torch.tensor(lengths)}
    return {
        "device": "cpu",
        "vla": vla,
        "inputs": {"x": torch.randn(2, 2 + tokens + 1, 8)},
        "trainable_params": list(proj.parameters()),
        "dataloader": [batch, batch],
        "action_l1": torch.zeros(()),
    }


def _masked_loss(cache_root: Path) -> dict:
    """An openpi-style step's own objects: episode keys and steps, the policy's visual tokens and action loss."""
    from sfcache.store import open_cache
    from sfcache.torch import SpatialForcingLoss

    cache = open_cache(cache_root / "stores" / "aloha")
    tokens = cache.provenance.targets.grid[0] * cache.provenance.targets.grid[1] * len(cache.views)
    return {
        "device": "cpu",
        "keys": cache.episodes[:2],
        "steps": [0, 1],
        "vision_tokens": torch.randn(2, tokens, 16),
        "align": SpatialForcingLoss(16, cache.channels),
        "action_loss": torch.zeros(()),
    }


CONTEXTS = {"oft_trainer": _oft_trainer, "masked_loss": _masked_loss}

# ----------------------------------------------------------------------------- the working folder

ALL = [(snippet, problems) for path in DOCS for snippet, problems in [collect(path)]]
SNIPPETS = [s for snippets, _ in ALL for s in snippets]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    from distributed import LocalCluster

    from sfcache.extract import ExtractConfig, extract
    from sfcache.sources.synthetic import write_lerobot, write_libero_hdf5

    root = tmp_path_factory.mktemp("snippets")
    libero = write_libero_hdf5(root / "data", suite="libero_spatial", tasks=2, demos=2, steps=10, size=32).path
    aloha = write_lerobot(root / "data" / "aloha", episodes=2, steps=3, size=32, names="lerobot").path
    small = {"vggt": "random:tiny", "grid": (4, 4), "steps_per_shard": 4, "batch_size": 4, "device": "cpu"}
    with LocalCluster(
        n_workers=1, processes=False, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.CRITICAL
    ) as cluster:
        for source, store, extra in (
            (libero, "spatial", {}),
            (aloha, "aloha", {"recipe": "openpi", "views": ("cam_high", "cam_left_wrist", "blank")}),
        ):
            config = ExtractConfig(
                source=source, out=root / "stores" / store, scheduler=cluster.scheduler_address, **small, **extra
            )
            extract(config, progress=False)
    return root


def test_the_docs_have_python_snippets_and_no_unfenced_python():
    problems = [p for _, found in ALL for p in found]
    assert not problems, "\n".join(problems)
    files = {s.file for s in SNIPPETS}
    assert {"README.md", "docs/openvla-oft.md"} <= files
    assert sum(s.skip is None for s in SNIPPETS if s.file == "README.md") >= 3


def test_collect_reads_fences_markers_and_section_skips(tmp_path, monkeypatch):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# T\n\n```python\nx = 1\n```\n\n<!-- snippet: skip: needs a GPU -->\n```python\ny = 2\n```\n\n"
        "## Patch\n<!-- snippets: skip: fragments -->\n\n### a\n```py\n  z\n```\n\n## Next\n\n"
        "<!-- snippet: context: oft_trainer -->\n```python\nvla\n```\n\n    import os\n    os.getcwd()\n\nthen\n\n"
        "    sf extract data --out s\n"
    )
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    found, problems = collect(doc)
    assert [(s.line, s.skip, s.context) for s in found] == [
        (3, None, None),
        (8, "needs a GPU", None),
        (16, "fragments", None),
        (23, None, "oft_trainer"),
    ]
    assert problems == ["doc.md:27: an indented block of Python; fence it as ```python so it runs"]


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.skip], ids=lambda s: s.where)
def test_skipped_snippets_import_names_that_exist(snippet):
    """A skipped block is not run, but the sfcache names it imports must exist."""
    found = re.findall(r"^[ \t]*from (sfcache[\w.]*) import (\([^)]*\)|[^\n#]*)", snippet.code, flags=re.M)
    for module, names in found:
        imported = importlib.import_module(module)
        for name in (n.split()[0] for n in names.strip("()").split(",") if n.strip()):
            if not hasattr(imported, name):  # a submodule: `from sfcache.integrations import openvla_oft`
                assert importlib.util.find_spec(f"{module}.{name}"), f"{snippet.where}: {module} has no {name}"


def run_snippet(snippet: Snippet, workspace: Path) -> dict:
    """Run one block in `workspace` (the current folder), failing with the doc line that broke; its namespace."""
    namespace = {"__name__": "__snippet__", **(CONTEXTS[snippet.context](workspace) if snippet.context else {})}
    try:
        exec(compile(snippet.code, snippet.where, "exec"), namespace)
        failure = None
    except Exception as error:  # noqa: BLE001  every failure is reported the same way, naming the doc line
        frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == snippet.where]
        line = snippet.line + frames[-1].lineno if frames else snippet.line
        failure = f"{snippet.file}:{line}: this snippet does not run as written: {type(error).__name__}: {error}"
    if failure:
        pytest.fail(f"{failure}\n(fix the doc or the API; markers: tests/test_snippets.py's docstring)", pytrace=False)
    return namespace


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")  # the OFT loop's autocast("cuda") on CPU
@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if not s.skip], ids=lambda s: s.where)
def test_snippet_runs_as_written(snippet, workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    run_snippet(snippet, workspace)


def _the(needle: str) -> Snippet:
    found = [s for s in SNIPPETS if needle in s.code and not s.skip]
    assert len(found) == 1, f"{len(found)} README snippets hold {needle!r}"
    return found[0]


def test_source_and_cache_snippets_name_one_episode_by_the_same_key(workspace, monkeypatch):
    """The README says where `key` comes from in both snippets, and that both list the same keys in order."""
    from sfcache.sources import open_source
    from sfcache.store import open_cache

    monkeypatch.chdir(workspace)
    source = run_snippet(_the("src.read(info.key"), workspace)
    assert source["steps"].frames.shape == (8, 2, 32, 32, 3) and source["steps"].actions.shape == (8, 7)
    cache = run_snippet(_the('sfcache.open_cache("stores/spatial")'), workspace)
    assert source["info"].key == cache["key"]
    assert [e.key for e in open_source("data/libero_spatial").episodes()] == open_cache("stores/spatial").episodes


def test_with_targets_snippet_joins_rows_of_a_plain_dataset(workspace, monkeypatch):
    from sfcache.store import open_cache

    monkeypatch.chdir(workspace)
    names = run_snippet(_the('WithTargets(samples, targets, index="index", lengths=lengths)'), workspace)
    joined, cache = names["joined"], open_cache("stores/spatial")
    last = len(joined) - 1
    key, step = cache.index.locate(last)
    expected = cache.read(key, steps=slice(step, step + 1))[0] + names["targets"].position_embedding().numpy()
    assert len(joined) == 40 and torch.allclose(joined[last]["sf_targets"], torch.from_numpy(expected), atol=1e-6)


def test_a_broken_snippet_fails_naming_its_doc_line(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    with pytest.raises(pytest.fail.Exception, match=r"README.md:12: this snippet does not run as written: NameError"):
        run_snippet(Snippet("README.md", 10, "x = 1\nsrc.read(key, 0, 8)\n"), workspace)


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")
def test_oft_trainer_snippet_aligns_the_stores_targets(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    names = run_snippet(_the("targets.targets_for(keys, steps, lengths=lengths)"), workspace)
    assert names["sf_targets"].shape == (2, 2, 16, 256) and torch.isfinite(names["loss"]) and names["loss"] > 0
