"""`fedmeki data import`: the command line of `import_dataset`, which reads raw files into one dataset file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmeki_core.tasks.catalog import TASKS, get_task
from fedmeki_core.tasks.formats.importer import describe_import, import_dataset
from fedmeki_core.tasks.formats.rules import Frames, ImportOptions


def _import_command(args: argparse.Namespace) -> int:
    options = ImportOptions(
        frames=Frames(args.frames), allow_burned_in=args.allow_burned_in, resample_slices=args.resample_slices
    )
    dataset, outcomes = import_dataset(
        get_task(args.task),
        args.source,
        args.out,
        labels_csv=args.labels,
        image_size=args.image_size,
        mask_dir=args.masks,
        options=options,
        report=args.report,
        skip_refused=args.skip_refused,
        schema=args.schema,
    )
    for outcome in outcomes:
        if not outcome.accepted:
            print(f"refused {outcome.source}: {outcome.reason}", file=sys.stderr)
    notes = "; ".join(outcomes[0].warnings) if args.schema is not None else ""
    print(describe_import(dataset, args.out) + (f" ({notes})" if notes else ""))
    return 0


def add_import_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `import` to the sub-commands of `fedmeki data`."""
    importer = commands.add_parser(
        "import", help="turn raw files (DICOM, PNG/JPEG, WFDB, CSV, NumPy, NIfTI, FedMEKI JSON) into a dataset file"
    )
    importer.add_argument("--task", required=True, choices=sorted(TASKS))
    importer.add_argument(
        "--source", type=Path, required=True, help="a FedMEKI .json file, a folder of files, or a table (.csv)"
    )
    importer.add_argument("--out", type=Path, required=True, help="the dataset file to write (.safetensors)")
    importer.add_argument("--labels", type=Path, help="CSV with the columns file,label for a folder source")
    importer.add_argument("--image-size", type=int, help="image side in pixels (default: the task's)")
    importer.add_argument("--masks", type=Path, help="folder of NIfTI masks named like the volumes")
    importer.add_argument("--schema", type=Path, help="a tabular task's schema.yaml: columns, types, rules")
    importer.add_argument(
        "--frames",
        choices=[f.value for f in Frames],
        default=Frames.REFUSE.value,
        help="a multi-frame DICOM file: refuse it (default), keep its first frame, or one sample per frame",
    )
    importer.add_argument(
        "--allow-burned-in", action="store_true", help="accept DICOM files whose Burned In Annotation is YES"
    )
    importer.add_argument(
        "--resample-slices", action="store_true", help="build CT volumes from fewer slices than the task's depth"
    )
    importer.add_argument("--report", type=Path, help="write one CSV row per source file: accepted or why not")
    importer.add_argument("--skip-refused", action="store_true", help="import the accepted files when some are refused")
    importer.set_defaults(handler=_import_command)
