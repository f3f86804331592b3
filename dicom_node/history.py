"""The patient's earlier films: what the node measured on each frontal film, kept in the queue's database,
and the change since the prior film that the SR and the SC report.

A patient is the pair (Issuer of Patient ID, Patient ID), kept only as a SHA-256 key: the history holds no
names and no IDs (`cxr-node history --patient ID` hashes the ID it is given). A film's time is when it was
taken (acquisition, else content, else study date and time), never when it arrived: the prior film is the
latest one taken before it, of the same patient, measured by the same model version.

An older film that arrives after newer ones is compared with the films taken before it; the newer films'
results, already sent and perhaps already read, are not revised: each SR names the prior it compared with,
so none of them is wrong, and a result the PACS holds does not change under the radiologist."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import pydicom
from pydicom.valuerep import DA, DT, TM

if TYPE_CHECKING:  # the queue imports this module in receivers, which never load the model
    from model.infer import Segmentation

# Which time a film was taken at, in order of preference (date keyword, time keyword).
FILM_TIMES = (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime"), ("StudyDate", "StudyTime"))


@dataclass(frozen=True)
class Film:
    """One analysed frontal film of a patient."""
    patient_key: str
    taken_at: float | None  # seconds since the epoch (the film's own clock, read as local time)
    source_uid: str
    study_uid: str
    sr_uid: str
    sr_series_uid: str
    model_version: str
    figures: dict  # opacity_pct, right_pct, left_pct, zone_pct {A-F}, brixia {A-F} or None, brixia_global

    @property
    def taken(self) -> str:
        return datetime.fromtimestamp(self.taken_at).strftime("%Y-%m-%d %H:%M") if self.taken_at is not None else "?"

    @property
    def day(self) -> str:
        return self.taken[:10]

    def row(self) -> dict:
        return dict(asdict(self), figures=json.dumps(self.figures, sort_keys=True))

    @classmethod
    def from_row(cls, row: dict) -> Film:
        fields = {name: row[name] for name in cls.__dataclass_fields__ if name != "figures"}
        return cls(**fields, figures=json.loads(row["figures"]))


@dataclass(frozen=True)
class ChangeLimits:
    """How far a figure must move to be a change rather than repeatability noise (model card)."""
    opacity_pct: float
    brixia_global: float


@dataclass(frozen=True)
class Change:
    prior: Film
    opacity_points: float            # this film's opacity % minus the prior's
    brixia_points: int | None        # the same for the Brixia global score (None unless both have one)
    limits: ChangeLimits

    @property
    def opacity_beyond(self) -> bool:
        return abs(self.opacity_points) > self.limits.opacity_pct

    @property
    def brixia_beyond(self) -> bool:
        return self.brixia_points is not None and abs(self.brixia_points) > self.limits.brixia_global

    @property
    def direction(self) -> str:
        """'increased', 'decreased' or 'unchanged' (within the repeatability of the opacity %)."""
        if not self.opacity_beyond:
            return "unchanged"
        return "increased" if self.opacity_points > 0 else "decreased"

    def sentence(self) -> str:
        """E.g. 'Opacity +12 points since 2020-03-14, beyond repeatability (9.4); Brixia +3' (ASCII: it
        goes into DICOM text without a character set of its own)."""
        verdict = "beyond" if self.opacity_beyond else "within"
        text = (f"Opacity {self.opacity_points:+.0f} points since {self.prior.day}, {verdict} repeatability "
                f"({self.limits.opacity_pct:.1f})")
        return text + (f"; Brixia {self.brixia_points:+d}" if self.brixia_points is not None else "")


def patient_key(patient_id: str, issuer: str = "") -> str | None:
    """The history's name for a patient; None without a Patient ID (such films have no history)."""
    patient_id = str(patient_id or "").strip()
    if not patient_id:
        return None
    return hashlib.sha256(f"{str(issuer or '').strip()}\0{patient_id}".encode()).hexdigest()


def film_time(ds: pydicom.Dataset) -> float | None:
    """When the film was taken: AcquisitionDateTime, else the first date (and time) of FILM_TIMES present."""
    try:
        if ds.get("AcquisitionDateTime"):
            return DT(ds.AcquisitionDateTime).timestamp()
        for date_keyword, time_keyword in FILM_TIMES:
            if ds.get(date_keyword):
                day = DA(ds.get(date_keyword))
                clock = TM(ds.get(time_keyword)) if ds.get(time_keyword) else None
                return datetime.combine(day, clock or datetime.min.time()).timestamp()
    except (ValueError, TypeError):  # a malformed date: the film cannot be placed in time
        return None
    return None


def figures(seg: Segmentation) -> dict:
    from model.infer import ZONES

    return {"opacity_pct": round(seg.opacity_pct, 2), "right_pct": round(seg.right_opacity_pct, 2),
            "left_pct": round(seg.left_opacity_pct, 2),
            "zone_pct": {z: round(seg.zone_opacity_pct[z], 2) for z in ZONES},
            "brixia": dict(seg.brixia) if seg.brixia else None, "brixia_global": seg.brixia_global}


def compare(seg: Segmentation, prior: Film, limits: ChangeLimits) -> Change:
    brixia = seg.brixia_global - prior.figures["brixia_global"] \
        if seg.brixia and prior.figures.get("brixia_global") is not None else None
    return Change(prior, round(seg.opacity_pct - prior.figures["opacity_pct"], 2), brixia, limits)
