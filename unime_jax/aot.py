"""Before you pay for a pod: compile the training step for a TPU topology on any host.

    python -m unime_jax.aot --config=configs/stage2.py[:preset] --topology=v5e-16 \
        [--topology=v5p-8 ...] [--config.KEY=VALUE ...]

The configured model is built abstractly from its ``config.json`` alone (no weights; a preset
for a paper backbone brings its own), the train step ``unime_jax.main`` runs (the same
``steps.make_train_step``, stage, LoRA and batch layout) is lowered for the topology's devices and
compiled by libtpu on this host. For each topology it prints a table and, last, one JSON line:
per-device argument / output / temporary bytes, HBM and headroom, XLA's and the analytic FLOPs per
step, the compile time, and the step time implied at 40% and 60% MFU. The fit is judged on the
total (arguments + outputs − donated + temporaries + code) against the chip's usable HBM: the
compiler itself only refuses temporaries that overflow. Exit status 1 when a topology does not
fit, with its largest buffers and what to change.

Needs libtpu (``pip install libtpu==0.0.42.1``, in requirements-dev.txt); topology names:
``v5e-16`` / ``v5litepod-16`` (chips), ``v6e-16`` (chips), ``v5p-8`` / ``v4-8`` (TensorCores,
two per chip: 4 chips), or libtpu's own ``v5e:4x4``, ``v5p:2x2x2``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from unime_jax.errors import UsageError, config_value, flags_parser, run_main

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file, optionally :preset."
)
_TOPOLOGY = flags.DEFINE_multi_string("topology", [], "TPU topology, e.g. v5e-16 (repeatable).")

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    kind: str  # libtpu's generation name
    hbm_bytes: int  # usable HBM per device (what the compiler enforces)
    peak_flops: float  # bf16 FLOP/s per device
    cores_per_chip: int  # how the pod name counts: TensorCores (v4, v5p) or chips (v5e, v6e)
    dims: int  # 2-D or 3-D torus


# Usable HBM as the compiler reports it when a program overflows (measured with libtpu 0.0.42.1).
CHIPS = {
    "v5e": Chip("v5e", int(15.75 * GiB), 197e12, 1, 2),
    "v6e": Chip("v6e", int(31.25 * GiB), 918e12, 1, 2),
    "v5p": Chip("v5p", int(95.74 * GiB), 459e12, 2, 3),
    "v4": Chip("v4", int(30.75 * GiB), 275e12, 2, 3),  # megacore: one device per chip
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
_SHAPES_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user wrote it
    chip: Chip
    libtpu_name: str  # e.g. "v5e:4x4"

    @property
    def num_devices(self) -> int:
        return math.prod(int(x) for x in self.libtpu_name.split(":")[1].split("x"))


def parse_topology(name: str) -> Topology:
    """``v5e-16``, ``v5litepod-16``, ``v5p-8``, ``v6e-4``, ``v4-8`` or ``v5e:4x4``."""
    m = re.fullmatch(r"([a-z0-9]+)[:](\d+(?:x\d+)+)", name)
    if m:
        kind = _ALIASES.get(m.group(1), m.group(1))
        if kind in CHIPS:
            return Topology(name, CHIPS[kind], f"{kind}:{m.group(2)}")
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
    if m:
        kind = _ALIASES.get(m.group(1), m.group(1))
        if kind in CHIPS:
            chip = CHIPS[kind]
            chips = int(m.group(2)) // chip.cores_per_chip
            shape = (_SHAPES_2D if chip.dims == 2 else _SHAPES_3D).get(chips)
            if shape:
                return Topology(name, chip, f"{kind}:{shape}")
    raise UsageError(
        f"--topology={name!r} is not a TPU slice this check knows",
        "use e.g. v5e-16 / v5litepod-16 (chips), v6e-16, v5p-8 / v4-8 (TensorCores) or a libtpu "
        "name such as v5e:4x4 or v5p:2x2x2",
    )


def tpu_devices(topology: Topology):
    """The topology's TPU devices, described by libtpu on this (CPU) host."""
    from jax.experimental import topologies

    kwargs = {"chip_config_name": "megacore"} if topology.chip.kind == "v4" else {}
    try:
        return topologies.get_topology_desc(
            topology_name=topology.libtpu_name, platform="tpu", **kwargs
        ).devices
    except Exception as e:  # libtpu missing, or a name it refuses
        raise UsageError(
            f"libtpu cannot describe {topology.libtpu_name} ({e})",
            "install it (pip install libtpu==0.0.42.1, see requirements-dev.txt)",
        ) from e


def model_directory(cfg) -> Path:
    """Where config.json comes from: ``--config.model`` (a directory; weights not needed) or the
    preset's bundled config of a paper backbone (``configs/models/<reference_model>.json``)."""
    if cfg.model and cfg.model != "demo":
        path = Path(cfg.model).expanduser()
        if not (path / "config.json").is_file():
            raise UsageError(
                f"--config.model={cfg.model!r} has no config.json",
                "point it at an HF model directory (config.json is enough for this check)",
            )
        return path
    if cfg.model == "demo":
        from unime_jax.demo.model import build

        hf_config, _ = build()
        return _bundle(hf_config)
    reference = cfg.get("reference_model", "")
    bundled = REPO / "configs" / "models" / f"{reference}.json"
    if not reference or not bundled.is_file():
        raise UsageError(
            "no model config: --config.model is empty and the preset names no bundled config",
            "pass --config.model=DIR (a directory with config.json)",
        )
    return _bundle(json.loads(bundled.read_text()))


def _bundle(hf_config: dict) -> Path:
    """A directory holding only ``config.json``, the form every model reader takes; removed
    when the process exits."""
    import atexit
    import shutil
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="unime_aot_"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    (directory / "config.json").write_text(json.dumps(hf_config))
    return directory


def abstract_batch(cfg, stage, family, model_cfg, hf_config, mesh) -> dict:
    """ShapeDtypeStructs of the largest batch the data pipeline can produce for ``cfg``: every
    row of a side at full length with one image at ``image_size`` (text only in stage 1)."""
    import jax
    import numpy as np

    from unime_jax import sharding
    from unime_jax.models.inputs import ModelInputs
    from unime_jax.preprocess.example import round_budget

    dp = sharding.data_parallel_size(mesh)
    rows, groups = cfg.batch_size, dp * cfg.num_chunks

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(
            shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape))
        )

    image = None if stage.text_only else family.image_shapes(model_cfg, hf_config, cfg.image_size)
    batch = {}
    for side, length in stage.lengths(cfg).items():
        if image is not None and image.tokens >= length:
            raise UsageError(
                f"an image at image_size={cfg.image_size} takes {image.tokens} tokens, more than "
                f"the {side} length {length}",
                f"raise --config.{side}_length or lower --config.image_size",
            )
        positions = spec((rows, length, *family.position_axes), np.int32)
        text = [spec((rows, length), np.int32), spec((rows, length), np.int32), positions]
        if image is None:
            batch[side] = ModelInputs(*text)
            continue
        units = cfg.tile_budget or round_budget(rows // groups * image.units)
        images = {k: spec((groups, units, *s), d) for k, (s, d) in image.unit_arrays.items()}
        images |= {k: spec((groups, *s), d) for k, (s, d) in image.constants.items()}
        taps = (rows, length, image.taps)
        batch[side] = ModelInputs(
            *text,
            images=images,
            image_index=spec(taps, np.int32),
            image_weight=spec(taps, np.float32),
        )
    for name, (shape, dtype) in stage.extras(cfg).items():
        batch[name] = spec((rows, *shape), dtype)
    return batch


def step_flops(cfg, stage, family, model_cfg, hf_config) -> float:
    """Model FLOPs of one step: forward and activation gradients (2x the forward) of every
    side of the global batch; GradCache's embedding pass and remat recomputation not counted."""
    image = None if stage.text_only else family.image_shapes(model_cfg, hf_config, cfg.image_size)
    total = 0.0
    for length in stage.lengths(cfg).values():
        units = cfg.batch_size * image.units if image is not None else 0
        total += 2 * family.forward_flops(model_cfg, cfg.batch_size, length, units)
    return total


@dataclasses.dataclass
class Report:
    topology: str
    libtpu_topology: str
    devices: int
    mesh: dict
    num_chunks: int
    fits: bool
    headroom_pct: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    total_bytes: int
    peak_bytes: int
    hbm_bytes: int
    flops: float  # analytic model FLOPs per step, per device
    xla_flops: float  # XLA's count per device (a scan body once; Pallas kernels not at all)
    compile_s: float
    step_s_at_40: float
    step_s_at_60: float
    largest: list


def largest_buffers(hlo: str, n: int = 5) -> list[str]:
    """The largest arrays an HLO program creates (a rough map of where temporaries go)."""
    sizes = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1}
    found = {}
    for m in re.finditer(r"= (\w+)\[([\d,]*)\]\S* (\w[\w-]*)\(", hlo):
        dtype, dims, op = m.groups()
        if dtype not in sizes or op in ("parameter", "constant", "get-tuple-element", "bitcast"):
            continue
        shape = tuple(int(d) for d in dims.split(",") if d)
        found[(dtype, shape, op)] = math.prod(shape) * sizes[dtype]
    top = sorted(found.items(), key=lambda kv: -kv[1])[:n]
    return [f"{op} {dtype}{list(shape)} {size / GiB:.2f} GiB" for (dtype, shape, op), size in top]


def check(cfg, topology: Topology) -> Report:
    """Compiles ``cfg``'s train step for ``topology`` and measures it (module doc)."""
    import jax
    import numpy as np
    from flax import nnx

    from unime_jax import checkpoint, families, sharding, stages, steps, train
    from unime_jax.models.config import param_dtype
    from unime_jax.models.layers import remat_policy
    from unime_jax.weights.hub import read_config

    stage = stages.get(cfg.stage)
    devices = tpu_devices(topology)
    mesh = sharding.make_mesh(dict(cfg.mesh), devices)
    cfg = stage.prepare_abstract(cfg)
    train.validate(cfg, mesh, stage, check_files=False)
    cfg.num_chunks = train.num_chunks(cfg, sharding.data_parallel_size(mesh))
    directory = model_directory(cfg)
    hf_config = read_config(directory)
    family = families.for_config(hf_config)
    model_cfg = family.parse_config(hf_config)
    if stage.text_only:
        model_cfg = family.text_only(model_cfg)
    if cfg.attention == "auto":
        cfg.attention = "splash"  # what "auto" resolves to on a TPU

    def build():
        module = family.build(
            model_cfg,
            rngs=nnx.Rngs(0),
            dtype=param_dtype(cfg.dtype),
            remat=remat_policy(cfg.remat),
            attention=cfg.attention,
        )
        return train.add_lora(cfg, family, module)

    graphdef, trainable, frozen = train.split_trainable(cfg, nnx.eval_shape(build))
    tx = steps.make_optimizer(cfg)
    step = steps.make_train_step(
        graphdef, tx, cfg, mesh, stage.loss_fn(cfg), stage.sides, trainable, frozen
    )
    state = jax.eval_shape(lambda t: steps.fresh_state(t, tx, cfg.seed), trainable)
    state = checkpoint.abstract_like(state, steps.train_state_shardings(trainable, tx, mesh))
    frozen = checkpoint.abstract_like(frozen, sharding.state_shardings(frozen, mesh))
    batch = abstract_batch(cfg, stage, family, model_cfg, hf_config, mesh)
    flops = step_flops(cfg, stage, family, model_cfg, hf_config) / len(devices)
    hbm = topology.chip.hbm_bytes
    report = functools.partial(
        Report,
        topology=topology.name,
        libtpu_topology=topology.libtpu_name,
        devices=len(devices),
        mesh=dict(mesh.shape),
        num_chunks=cfg.num_chunks,
        hbm_bytes=hbm,
        flops=flops,
        step_s_at_40=round(flops / (0.4 * topology.chip.peak_flops), 2),
        step_s_at_60=round(flops / (0.6 * topology.chip.peak_flops), 2),
    )
    start = time.perf_counter()
    try:
        compiled = step.lower(state, frozen, batch).compile()
    except Exception as e:  # the compiler refuses temporaries that overflow HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return overflow(report, str(e), time.perf_counter() - start)
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    total = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    need = max(total, mem.peak_memory_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return report(
        fits=need <= hbm,
        headroom_pct=round(100 * (1 - need / hbm), 1),
        argument_bytes=mem.argument_size_in_bytes,
        output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes,
        code_bytes=mem.generated_code_size_in_bytes,
        total_bytes=total,
        peak_bytes=mem.peak_memory_in_bytes,
        xla_flops=float(cost.get("flops", np.nan)),
        compile_s=round(compile_s, 1),
        largest=[] if need <= hbm else largest_buffers(compiled.as_text()),
    )


def overflow(report, message: str, seconds: float) -> Report:
    """The report of a program the compiler refused: what it says it needed, and its list of the
    largest allocations."""
    used = re.search(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm", message)
    scale = {None: 1, "K": 2**10, "M": 2**20, "G": GiB, "T": 2**40}
    need = int(float(used.group(1)) * scale[used.group(2)]) if used else 0
    lines = [
        line.strip()
        for line in message.splitlines()
        if re.search(r"(Size|Shape|Allocation type): ", line)
    ]
    hbm = report.keywords["hbm_bytes"]
    return report(
        fits=False,
        headroom_pct=round(100 * (1 - need / hbm), 1) if need else float("-inf"),
        argument_bytes=0,
        output_bytes=0,
        alias_bytes=0,
        temp_bytes=need,
        code_bytes=0,
        total_bytes=need,
        peak_bytes=need,
        xla_flops=float("nan"),
        compile_s=round(seconds, 1),
        largest=lines[:15] or [message.splitlines()[0][:300]],
    )


def table(reports: list[Report]) -> str:
    head = (
        f"{'topology':<14}{'devices':>8}{'chunks':>7}{'args':>8}{'temp':>8}{'total':>8}"
        f"{'peak':>8}{'HBM':>8}{'headroom':>9}{'TFLOP/dev':>10}{'step@40%':>9}{'compile':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in reports:
        lines.append(
            f"{r.topology:<14}{r.devices:>8}{r.num_chunks:>7}{r.argument_bytes / GiB:>7.1f}G"
            f"{r.temp_bytes / GiB:>7.1f}G{r.total_bytes / GiB:>7.1f}G{r.peak_bytes / GiB:>7.1f}G"
            f"{r.hbm_bytes / GiB:>7.1f}G{r.headroom_pct:>8.1f}%{r.flops / 1e12:>10.1f}"
            f"{r.step_s_at_40:>8.2f}s{r.compile_s:>7.0f}s"
        )
    return "\n".join(lines)


def advice(r: Report) -> str:
    return (
        f"{r.topology}: needs {r.total_bytes / GiB:.1f} GiB per device of {r.hbm_bytes / GiB:.1f} "
        f"GiB; largest buffers: {'; '.join(r.largest) or 'n/a'}"
    )


def run(cfg, topologies: list[str]) -> int:
    if not topologies:
        raise UsageError("no --topology given", "pass e.g. --topology=v5e-16 --topology=v5p-8")
    parsed = [parse_topology(t) for t in topologies]
    reports = []
    for topology in parsed:
        logging.info("compiling for %s (%s) ...", topology.name, topology.libtpu_name)
        reports.append(check(cfg.copy_and_resolve_references(), topology))
    print(table(reports))
    failed = [r for r in reports if not r.fits]
    for r in failed:
        print(f"error: the step does not fit {advice(r)}", file=sys.stderr)
    if failed:
        print(
            "Fix: more GradCache chunks (--config.chunk_rows=1 or a larger --config.num_chunks), "
            "smaller images (--config.image_size) or tile pools (--config.tile_budget), "
            "--config.remat=full or offload, or more devices in the fsdp / tensor mesh axes",
            file=sys.stderr,
        )
    for r in reports:
        print(json.dumps(dataclasses.asdict(r)))
    return 1 if failed else 0


def main(argv: list[str]) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    # Compile for TPUs without claiming any: JAX computes on the CPU; libtpu only compiles.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # quiets libtpu's host probe
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # don't fail on a busy lock file
    import jax

    jax.config.update("jax_platforms", "cpu")

    def go() -> int:
        return run(config_value(_CONFIG), _TOPOLOGY.value)

    sys.exit(run_main(go))


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser("check the flag and the keys of configs/stage*.py"))
