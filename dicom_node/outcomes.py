"""What a destination's answer means for a result, whatever the protocol (C-STORE: sender.py, STOW-RS:
dicomweb_sender.py): stored, stored with a warning, worth trying again, or refused for good."""
from __future__ import annotations

STORED, WARNING, TRANSIENT, PERMANENT = "stored", "warning", "transient", "permanent"
# Failures worth trying again as they are: the PACS is short of resources or busy.
TRANSIENT_STATUSES = {0x0110: "processing failure", 0x0210: "duplicate invocation", 0x0213: "resource limitation"}


def status_class(status: int | None) -> str:
    """What a C-STORE answer means for the result: STORED, WARNING, TRANSIENT or PERMANENT.
    No answer (association lost) is TRANSIENT; failures not known to pass (0xA9xx data set does not
    match the SOP class, 0xCxxx cannot understand, 0x0122 SOP class not supported, ...) are PERMANENT."""
    if status is None:
        return TRANSIENT
    if status == 0x0000:
        return STORED
    if status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return WARNING
    if 0xA700 <= status <= 0xA7FF or status in TRANSIENT_STATUSES:
        return TRANSIENT
    return PERMANENT
