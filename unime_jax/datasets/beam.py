"""Apache Beam for the big builds (MMEB-train; COCO / Karpathy go through it too when present).

Optional: apache-beam 2.77 needs protobuf < 7 and the runtime pins protobuf 7.36.2, so Beam lives
in a separate build environment (``requirements-beam.txt``). Where ``apache_beam`` imports, the
builders hand TFDS a Beam pipeline instead of a Python generator, and ``python -m
unime_jax.datasets build ... --beam_pipeline_options=runner=DirectRunner,direct_num_workers=8``
(or Dataflow / Flink / Spark options) runs it; elsewhere they generate in-process. Both give the same examples in the same order
(keys are row positions; the builders disable shuffling) and the same report.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from unime_jax.datasets import mmeb_rows


def available() -> bool:
    """Whether Beam is installed (then the builders generate with it)."""
    return importlib.util.find_spec("apache_beam") is not None


def keyed_examples(items: list[Any], make_example, *args: Any):
    """A Beam transform: ``(position, make_example(item, *args))`` for each item (in workers)."""
    import apache_beam as beam

    @beam.ptransform_fn
    def generate(top):
        return (
            top
            | "items" >> beam.Create(list(enumerate(items)))
            | "examples" >> beam.MapTuple(lambda key, x: (key, make_example(x, *args)))
        )

    return generate()


def validated_examples(
    rows: list[tuple[str, int, Any]],
    root: Path,
    report: mmeb_rows.ConversionReport,
    sources: list[dict[str, Any]],
    report_path,
):
    """MMEB-train rows validated in Beam workers: the good rows' examples keyed by position,
    and the conversion report (``report`` already counts the rows beyond the limit) written
    to ``report_path`` once every row has been checked."""
    import apache_beam as beam

    from unime_jax.datasets.mmeb_train import example

    class Check(beam.DoFn):
        def setup(self):
            self.validator = mmeb_rows.Validator(root)

        def process(self, position_row):
            position, (name, index, row) = position_row
            try:
                fields = self.validator.row(row)
            except mmeb_rows.BadRow as e:
                yield position, name, index, None, e.reason, e.detail
                return
            yield position, name, index, {**fields, "dataset": name, "row": index}, "", ""

    @beam.ptransform_fn
    def generate(top):
        outcomes = (
            top | "rows" >> beam.Create(list(enumerate(rows))) | "validate" >> beam.ParDo(Check())
        )
        _ = (
            outcomes
            | "drop records" >> beam.Map(lambda o: (*o[:3], *o[4:]))
            | "all outcomes" >> beam.combiners.ToList()
            | "write report" >> beam.Map(_write_report, report, sources, str(report_path))
        )
        return (
            outcomes
            | "good rows" >> beam.Filter(lambda o: o[3] is not None)
            | "encode" >> beam.Map(lambda o: (o[0], example(o[3], root)))
        )

    return generate()


def _write_report(outcomes, report: mmeb_rows.ConversionReport, sources, path: str) -> None:
    import json

    from etils import epath

    for _, name, index, reason, detail in sorted(outcomes):
        if reason:
            report.add_bad(name, index, reason, detail)
        else:
            report.add_good(name)
    text = json.dumps(report.to_dict() | {"sources": sources}, indent=1) + "\n"
    epath.Path(path).write_text(text)
