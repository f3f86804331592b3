"""The patient's earlier films: what the node measured on each frontal film, kept in the queue's database,
and the change since the prior film that the SR and the SC report.

A patient is the pair (Issuer of Patient ID, Patient ID), kept only as an HMAC-SHA-256 key under a secret
of the site (`[retention] history_key_file`, outside the database): the history holds no names and no IDs,
and the keys cannot be reversed by trying IDs without that secret (pseudonymised, not anonymous). A
film's time is when it was taken (acquisition, else content, else study date and time; the first that
can be read), as the wall clock written on it (UTC offsets ignored: one site's films share a clock),
never when it arrived. The prior film is the latest one taken before it, of the same patient, measured
by the same model version; a film whose time of day is unknown is before or after another only on
another day.

An older film that arrives after newer ones is compared with the films taken before it; the newer films'
results, already sent and perhaps already read, are not revised: each SR names the prior it compared with,
so none of them is wrong, and a result the PACS holds does not change under the radiologist."""
from __future__ import annotations

import calendar
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.valuerep import DA, DT, TM

if TYPE_CHECKING:  # the queue imports this module in receivers, which never load the model
    from model.infer import Segmentation

# Which time a film was taken at, in order of preference (date keyword, time keyword).
FILM_TIMES = (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime"), ("StudyDate", "StudyTime"))
DAY = 86400


@dataclass(frozen=True)
class Film:
    """One analysed frontal film of a patient."""
    patient_key: str
    taken_at: float | None  # the film's wall clock as seconds since 1970 read as UTC; None: unknown
    time_known: bool        # False: only the day is known (taken_at is its midnight)
    source_uid: str
    study_uid: str
    sr_uid: str
    sr_series_uid: str
    model_version: str
    figures: dict  # opacity_pct, right_pct, left_pct, zone_pct {A-F}, brixia {A-F} or None, brixia_global

    @property
    def taken(self) -> str:
        """'2020-03-14 10:15', or '2020-03-14' when the time of day is unknown, or '?'."""
        if self.taken_at is None:
            return "?"
        return datetime.fromtimestamp(self.taken_at, timezone.utc).strftime("%Y-%m-%d %H:%M" if self.time_known else "%Y-%m-%d")

    @property
    def day(self) -> str:
        return self.taken[:10]

    def row(self) -> dict:
        return dict(asdict(self), figures=json.dumps(self.figures, sort_keys=True), time_known=int(self.time_known))

    @classmethod
    def from_row(cls, row: dict) -> Film:
        fields = {name: row[name] for name in cls.__dataclass_fields__ if name not in ("figures", "time_known")}
        return cls(**fields, time_known=bool(row["time_known"]), figures=json.loads(row["figures"]))


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
    same_day: bool                   # the prior was taken on this film's day: its time is what tells them apart

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
        """E.g. 'Opacity +12 points since 2020-03-14, beyond repeatability (9.4); Brixia +3, beyond
        repeatability (1.6)' (ASCII: it goes into DICOM text without a character set of its own)."""
        def verdict(beyond: bool) -> str:
            return "beyond" if beyond else "within"
        since = self.prior.taken if self.same_day else self.prior.day
        text = (f"Opacity {round(self.opacity_points):+d} points since {since}, {verdict(self.opacity_beyond)} "
                f"repeatability ({self.limits.opacity_pct:.1f})")
        if self.brixia_points is not None:
            text += (f"; Brixia {self.brixia_points:+d}, {verdict(self.brixia_beyond)} repeatability "
                     f"({self.limits.brixia_global:.1f})")
        return text


def history_key(path: Path, create: bool) -> bytes | None:
    """The site's secret for patient keys: read from `path`, or made there (0600) when `create`; None when
    it does not exist and is not to be made (no history on this host yet)."""
    path = Path(path)
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
                file.write(secrets.token_hex(32) + "\n")
        except FileExistsError:  # another process of the node made it first
            pass
    return path.read_text().strip().encode() if path.exists() else None


def patient_key(secret: bytes, patient_id: str, issuer: str = "") -> str | None:
    """The history's name for a patient; None without a Patient ID (such films have no history)."""
    patient_id = str(patient_id or "").strip()
    if not patient_id:
        return None
    return hmac.new(secret, f"{str(issuer or '').strip()}\0{patient_id}".encode(), hashlib.sha256).hexdigest()


def _wall_clock(moment: datetime) -> float:
    """A film's date and time as written, in seconds since 1970 read as UTC (offsets ignored)."""
    return float(calendar.timegm(moment.replace(tzinfo=None).timetuple()))


def film_time(ds: pydicom.Dataset) -> tuple[float | None, bool]:
    """(when the film was taken, whether the time of day is known): AcquisitionDateTime, else the first
    pair of FILM_TIMES whose date (and time, if present) can be read; (None, False) when none can."""
    if ds.get("AcquisitionDateTime"):
        try:
            moment = DT(ds.AcquisitionDateTime)
            return _wall_clock(moment), len(str(ds.AcquisitionDateTime)) > 8
        except (ValueError, TypeError):
            pass  # malformed: the next source may be readable
    for date_keyword, time_keyword in FILM_TIMES:
        try:
            if not ds.get(date_keyword):
                continue
            day, clock = DA(ds.get(date_keyword)), TM(ds.get(time_keyword)) if ds.get(time_keyword) else None
            return _wall_clock(datetime.combine(day, clock or datetime.min.time())), clock is not None
        except (ValueError, TypeError):
            continue
    return None, False


def figures(seg: Segmentation) -> dict:
    from model.infer import ZONES

    return {"opacity_pct": round(seg.opacity_pct, 2), "right_pct": round(seg.right_opacity_pct, 2),
            "left_pct": round(seg.left_opacity_pct, 2),
            "zone_pct": {z: round(seg.zone_opacity_pct[z], 2) for z in ZONES},
            "brixia": dict(seg.brixia) if seg.brixia else None, "brixia_global": seg.brixia_global}


def compare(seg: Segmentation, prior: Film, limits: ChangeLimits, taken_at: float) -> Change:
    brixia = seg.brixia_global - prior.figures["brixia_global"] \
        if seg.brixia and prior.figures.get("brixia_global") is not None else None
    points = round(seg.opacity_pct - prior.figures["opacity_pct"], 2) + 0.0  # + 0.0: never "-0"
    return Change(prior, points, brixia, limits, same_day=prior.taken_at // DAY == taken_at // DAY)
