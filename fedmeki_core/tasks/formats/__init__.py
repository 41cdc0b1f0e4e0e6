"""Readers of the real formats silos hold (DICOM, PNG/JPEG, WFDB, CSV, NumPy, NIfTI, FedMEKI JSON) and the importer.

Every reader returns float32 arrays in the task catalogue's sample conventions and raises InvalidInputError,
naming the file and the problem, for anything it cannot read.
"""

from fedmeki_core.tasks.formats.conversations import read_conversations
from fedmeki_core.tasks.formats.ct import read_ct_slices, read_ct_volume
from fedmeki_core.tasks.formats.ecg import read_ecg
from fedmeki_core.tasks.formats.ehr import read_ehr
from fedmeki_core.tasks.formats.importer import import_dataset
from fedmeki_core.tasks.formats.rules import Frames, ImportOptions
from fedmeki_core.tasks.formats.sources import read_sample
from fedmeki_core.tasks.formats.xray import read_xray

__all__ = [
    "Frames",
    "ImportOptions",
    "import_dataset",
    "read_conversations",
    "read_ct_slices",
    "read_ct_volume",
    "read_ecg",
    "read_ehr",
    "read_sample",
    "read_xray",
]
