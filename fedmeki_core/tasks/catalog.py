"""The task catalogue: modality, sample shape, label type, metrics, role and source format of every task.

Plain data without torch, so the coordinator validates job specs against it. A *suite* names a set of tasks a
job trains and evaluates together (FedMEKI's four training and four zero-shot tasks).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fedmeki_core.errors import NotFoundError


class Modality(enum.StrEnum):
    XRAY = "xray"  # [1, S, S] grey levels in [0, 1]; S is the model's image_size
    ECG = "ecg"  # [12, 1000]: 12 leads, 10 s at 100 Hz, millivolts
    EHR = "ehr"  # [T, 48]: hourly clinical features, standardised
    CT_VOLUME = "ct-volume"  # [1, D, S, S] Hounsfield units scaled to [0, 1]
    CT_SLICE = "ct-slice"  # [1, S, S] one axial slice scaled to [0, 1]
    VITALS = "vitals"  # [16, 8]: the demo's synthetic vital signs
    TABLE = "table"  # [F]: one row of a hospital's table, encoded by its schema; F is the model's num_features
    TEXT = "text"  # instructions and answers, tokenised at the silo by the base's own tokenizer


class LabelType(enum.StrEnum):
    BINARY = "binary"  # labels 0/1; the injected model answers "yes" or "no"
    TEXT = "text"  # a free-text answer to a question about the sample
    MASK = "mask"  # a per-pixel 0/1 segmentation mask
    # A class index in each silo's own label space (0 .. k_silo - 1, k_silo <= num_classes): every silo keeps a
    # head sized to its own classes, as the universal medical imaging model does.
    SILO_CLASSES = "silo-classes"
    MULTICLASS = "multiclass"  # a class index 0 .. k - 1 shared by every silo; k is the model's num_classes
    REGRESSION = "regression"  # a real number per sample (the dataset's `targets`; its labels are -1)


class Role(enum.StrEnum):
    TRAIN = "train"  # silos train the modality encoder on it
    ZERO_SHOT = "zero-shot"  # only the injected foundation model is evaluated on it


# Which sample dimensions follow the model's image_size, or num_features for a table (the rest are fixed).
RESIZABLE = {Modality.XRAY: (1, 2), Modality.CT_VOLUME: (2, 3), Modality.CT_SLICE: (1, 2), Modality.TABLE: (0,)}


@dataclass(frozen=True)
class DicomAcceptance:
    """The DICOM files an imaging task takes: both the Modality and the SOP Class UID must be listed."""

    kind: str  # what a person calls the image: "a chest X-ray"
    modalities: frozenset[str]
    sop_classes: frozenset[str]

    def describe(self) -> str:
        return f"{self.kind} (modality {' or '.join(sorted(self.modalities))})"


# CR and DX images; also Secondary Capture with modality CR/DX, the form of the RSNA Pneumonia challenge's files
# (lung-opacity's source). Mammography, fluoroscopy and angiography are X-ray too, but not chest radiographs.
XRAY_DICOM = DicomAcceptance(
    kind="a chest X-ray",
    modalities=frozenset({"CR", "DX"}),
    sop_classes=frozenset(
        {
            "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
            "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
            "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
            "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        }
    ),
)
# Single-slice CT images of a series; an Enhanced CT file (all slices in one multi-frame object) is not read yet.
CT_DICOM = DicomAcceptance(
    kind="a CT slice", modalities=frozenset({"CT"}), sop_classes=frozenset({"1.2.840.10008.5.1.4.1.1.2"})
)


@dataclass(frozen=True)
class TaskInfo:
    name: str
    modality: Modality
    description: str
    input_shape: tuple[int, ...]  # one sample at the canonical resolution, without the batch dimension
    label_type: LabelType
    metric: str  # the headline metric
    role: Role
    source_format: str  # the real format the loader reads
    source_dataset: str  # what the paper used
    question: str = ""  # the instruction a classification task asks the injected model
    num_classes: int = 2
    dicom: DicomAcceptance | None = None  # the DICOM files an imaging task imports; None: no DICOM

    def sample_shape(self, image_size: int | None = None) -> tuple[int, ...]:
        """The shape of one sample when images are `image_size` pixels square (canonical when None)."""
        shape = list(self.input_shape)
        if image_size is not None:
            for dim in RESIZABLE.get(self.modality, ()):
                shape[dim] = image_size
        return tuple(shape)

    @property
    def metrics(self) -> tuple[str, ...]:
        if self.modality == Modality.TEXT:  # scored from a pretrained LM's greedy answers (tasks/scoring.py)
            return ("exact_match", "choice_accuracy", "bleu1", "rouge1", "meteor", "loss")
        if self.label_type == LabelType.TEXT:
            return ("bleu1", "rouge1", "meteor")
        if self.label_type == LabelType.MASK:
            return ("dice",)
        if self.label_type == LabelType.REGRESSION:
            return ("loss", "mae", "rmse", "r2")
        return ("accuracy", "precision", "recall", "f1", "mcc")


_XRAY = (1, 224, 224)
_CT_VOLUME = (1, 32, 128, 128)

TASKS: dict[str, TaskInfo] = {
    task.name: task
    for task in (
        TaskInfo(
            name="synthetic-vitals",
            modality=Modality.VITALS,
            description="Binary deterioration label from 16 hourly readings of 8 synthetic vital signs",
            input_shape=(16, 8),
            label_type=LabelType.BINARY,
            metric="accuracy",
            role=Role.TRAIN,
            source_format="safetensors",
            source_dataset="synthetic (the demo)",
        ),
        TaskInfo(
            name="tabular",
            modality=Modality.TABLE,
            description="A binary label from one row of a hospital's own table, encoded by its schema.yaml",
            input_shape=(8,),  # the width its schema encodes, the model's num_features (8 for synthetic tables)
            label_type=LabelType.BINARY,
            metric="accuracy",
            role=Role.TRAIN,
            source_format="CSV + schema.yaml",
            source_dataset="the hospital's own",
        ),
        TaskInfo(
            name="tabular-multiclass",
            modality=Modality.TABLE,
            description="One of several classes from one row of a hospital's own table, encoded by its schema.yaml",
            input_shape=(8,),
            label_type=LabelType.MULTICLASS,
            metric="accuracy",
            role=Role.TRAIN,
            source_format="CSV + schema.yaml",
            source_dataset="the hospital's own",
            num_classes=32,  # the most; a job's model names its own num_classes
        ),
        TaskInfo(
            name="tabular-regression",
            modality=Modality.TABLE,
            description="A real number from one row of a hospital's own table, encoded by its schema.yaml",
            input_shape=(8,),
            label_type=LabelType.REGRESSION,
            metric="rmse",
            role=Role.TRAIN,
            source_format="CSV + schema.yaml",
            source_dataset="the hospital's own",
            num_classes=1,  # one output: the prediction
        ),
        TaskInfo(
            name="xray-local-findings",
            modality=Modality.XRAY,
            description="Chest X-ray findings in each hospital's own label space (2 to 4 classes; heads stay local)",
            input_shape=_XRAY,
            dicom=XRAY_DICOM,
            label_type=LabelType.SILO_CLASSES,
            metric="accuracy",
            role=Role.TRAIN,
            source_format="DICOM",
            source_dataset="synthetic (the universal imaging model's per-silo label spaces)",
            num_classes=4,
        ),
        TaskInfo(
            name="lung-opacity",
            modality=Modality.XRAY,
            description="Lung opacity detection on chest X-rays",
            input_shape=_XRAY,
            dicom=XRAY_DICOM,
            label_type=LabelType.BINARY,
            metric="accuracy",
            role=Role.TRAIN,
            source_format="DICOM",
            source_dataset="RSNA Pneumonia",
            question="Is there lung opacity in this chest X-ray?",
        ),
        TaskInfo(
            name="covid-19",
            modality=Modality.XRAY,
            description="COVID-19 detection on chest X-rays",
            input_shape=_XRAY,
            dicom=XRAY_DICOM,
            label_type=LabelType.BINARY,
            metric="accuracy",
            role=Role.TRAIN,
            source_format="PNG/JPEG",
            source_dataset="COVID-19 Radiography",
            question="Does this chest X-ray show COVID-19?",
        ),
        TaskInfo(
            name="ecg-abnormal",
            modality=Modality.ECG,
            description="Abnormal 12-lead ECG detection",
            input_shape=(12, 1000),
            label_type=LabelType.BINARY,
            metric="accuracy",
            role=Role.TRAIN,
            source_format="WFDB/NumPy/CSV",
            source_dataset="PTB-XL",
            question="Is this 12-lead ECG abnormal?",
        ),
        TaskInfo(
            name="mortality",
            modality=Modality.EHR,
            description="In-hospital mortality from the first 24 hours of ICU data",
            input_shape=(24, 48),
            label_type=LabelType.BINARY,
            metric="accuracy",
            role=Role.TRAIN,
            source_format="CSV/NumPy",
            source_dataset="MIMIC-III style, 24 x 48",
            question="Will this ICU patient die in hospital?",
        ),
        TaskInfo(
            name="sepsis",
            modality=Modality.EHR,
            description="Sepsis onset from a week of ICU data",
            input_shape=(168, 48),
            label_type=LabelType.BINARY,
            metric="accuracy",
            role=Role.ZERO_SHOT,
            source_format="CSV/NumPy",
            source_dataset="MIMIC-III style, 168 x 48",
            question="Does this ICU patient develop sepsis?",
        ),
        TaskInfo(
            name="enlarged-cardiomediastinum",
            modality=Modality.XRAY,
            description="Enlarged cardiomediastinum on chest X-rays",
            input_shape=_XRAY,
            dicom=XRAY_DICOM,
            label_type=LabelType.BINARY,
            metric="accuracy",
            role=Role.ZERO_SHOT,
            source_format="PNG/JPEG",
            source_dataset="CheXpert",
            question="Is the cardiomediastinum enlarged in this chest X-ray?",
        ),
        TaskInfo(
            name="medvqa",
            modality=Modality.XRAY,
            description="Free-text answers to questions about chest X-rays",
            input_shape=_XRAY,
            dicom=XRAY_DICOM,
            label_type=LabelType.TEXT,
            metric="bleu1",
            role=Role.ZERO_SHOT,
            source_format="PNG/JPEG + JSON",
            source_dataset="VQA-RAD",
            num_classes=0,
        ),
        TaskInfo(
            name="ecg-noise",
            modality=Modality.ECG,
            description="Free-text answers on the noise in a 12-lead ECG",
            input_shape=(12, 1000),
            label_type=LabelType.TEXT,
            metric="bleu1",
            role=Role.ZERO_SHOT,
            source_format="WFDB/NumPy/CSV + JSON",
            source_dataset="ECG-QA",
            num_classes=0,
        ),
        TaskInfo(
            name="instructions",
            modality=Modality.TEXT,
            description="Instruction tuning of a pretrained causal LM on the answers' tokens",
            input_shape=(),  # token sequences of the job's max_length
            label_type=LabelType.TEXT,
            metric="exact_match",
            role=Role.TRAIN,
            source_format="JSONL {instruction, input, output}",
            source_dataset="medical flashcards style (FlowerTune)",
            num_classes=0,
        ),
        TaskInfo(
            name="ct-covid",
            modality=Modality.CT_VOLUME,
            description="Healthy vs patient from a chest CT volume (PPPML-HMI)",
            input_shape=_CT_VOLUME,
            dicom=CT_DICOM,
            label_type=LabelType.BINARY,
            metric="accuracy",
            role=Role.TRAIN,
            source_format="NIfTI/DICOM series",
            source_dataset="PPPML-HMI CT volumes",
            question="Does this chest CT show infection?",
        ),
        TaskInfo(
            name="ct-infection-segmentation",
            modality=Modality.CT_SLICE,
            description="Lung infection segmentation on axial CT slices (PPPML-HMI)",
            input_shape=(1, 256, 256),
            label_type=LabelType.MASK,
            metric="dice",
            role=Role.TRAIN,
            source_format="NIfTI/DICOM",
            source_dataset="PPPML-HMI CT slices",
            num_classes=0,
        ),
    )
}


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    train: tuple[str, ...]
    zero_shot: tuple[str, ...]

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.train + self.zero_shot


SUITES: dict[str, Suite] = {
    "fedmeki": Suite(
        name="fedmeki",
        description="FedMEKI: 4 training tasks (encoders federated, injected into the foundation model), 4 zero-shot",
        train=("lung-opacity", "covid-19", "ecg-abnormal", "mortality"),
        zero_shot=("sepsis", "enlarged-cardiomediastinum", "medvqa", "ecg-noise"),
    ),
}


def get_task(name: str) -> TaskInfo:
    try:
        return TASKS[name]
    except KeyError:
        raise NotFoundError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def injection_tasks(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What the injection stage of a job on `name` fine-tunes on and scores: a suite's training tasks and all its
    tasks; for one training task of a suite (FedMEKI's single-task setting), that task, and it with the suite's
    zero-shot tasks of the same modality (the only ones its encoder can read). Empty when `name` has no injection."""
    if name in SUITES:
        return SUITES[name].train, SUITES[name].tasks
    for suite in SUITES.values():
        if name in suite.train:
            modality = get_task(name).modality
            zero_shot = tuple(t for t in suite.zero_shot if get_task(t).modality == modality)
            return (name,), (name, *zero_shot)
    return (), ()


def training_tasks(name: str) -> tuple[str, ...]:
    """The tasks silos train for a job's `task`: the suite's training tasks, or the task itself."""
    return SUITES[name].train if name in SUITES else (get_task(name).name,)
