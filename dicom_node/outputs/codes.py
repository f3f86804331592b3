"""Coded concepts the results use: standard codes where DICOM has them, private ones where it has none."""
from __future__ import annotations

import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

LUNG = codes.SCT.Lung  # SCT 39607008; right and left by a laterality modifier, as DICOM value sets expect
OPACITY = codes.DCM.Opacity  # DCM 112001
LATERALITY = {"right": codes.SCT.Right, "left": codes.SCT.Left, "bilateral": codes.SCT.Bilateral}
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
# A measurement of one lung names that lung with SNOMED's own concept, so text renderers print the
# side beside the value (a laterality modifier is a nested item they move to an annex).
ONE_LUNG = {"right": Code("3341006", "SCT", "Right lung"), "left": Code("44029006", "SCT", "Left lung")}

# No standard code exists for "opacity area as a percentage of lung area": a private scheme, as
# DICOM PS3.16 allows (designators starting with 99 are private).
PRIVATE_SCHEME = "99CXRNODE"
OPACITY_PERCENT = Code("CXRN-1", PRIVATE_SCHEME, "Opacity percentage of lung area")
# Nor for the Brixia score (Borghesi & Maroldi 2020) of a lung zone (0-3) or of both lungs (0-18).
BRIXIA_ZONE_SCORE = Code("CXRN-2", PRIVATE_SCHEME, "Brixia zone score")
BRIXIA_GLOBAL_SCORE = Code("CXRN-3", PRIVATE_SCHEME, "Brixia global score")
# The expected opacity % of a zone (mean opacity probability over it), which the Brixia zone score is read from.
EXPECTED_OPACITY_PERCENT = Code("CXRN-4", PRIVATE_SCHEME, "Expected opacity percentage of zone")
SCORE_UNIT = Code("{score}", "UCUM", "score")
# The change since the patient's prior film (dicom_node/history.py): no standard concepts for these either.
PRIOR_OPACITY_PERCENT = Code("CXRN-5", PRIVATE_SCHEME, "Opacity percentage of lung area on prior film")
OPACITY_PERCENT_CHANGE = Code("CXRN-6", PRIVATE_SCHEME, "Change in opacity percentage since prior film, in points")
PRIOR_BRIXIA_GLOBAL_SCORE = Code("CXRN-7", PRIVATE_SCHEME, "Brixia global score on prior film")
BRIXIA_GLOBAL_SCORE_CHANGE = Code("CXRN-8", PRIVATE_SCHEME, "Change in Brixia global score since prior film")
OPACITY_REPEATABILITY_LIMIT = Code("CXRN-9", PRIVATE_SCHEME, "Repeatability limit of opacity percentage")
BRIXIA_REPEATABILITY_LIMIT = Code("CXRN-12", PRIVATE_SCHEME, "Repeatability limit of Brixia global score")
OPACITY_CHANGE = Code("CXRN-10", PRIVATE_SCHEME, "Opacity change since prior film")
BEYOND_REPEATABILITY = Code("CXRN-11", PRIVATE_SCHEME, "Change beyond repeatability limit")
# Its values: SNOMED CT change qualifiers; "no status change" where the change is within repeatability.
CHANGE_DIRECTION = {"increased": Code("35105006", "SCT", "Increased"), "decreased": Code("1250004", "SCT", "Decreased"),
                    "unchanged": Code("260388006", "SCT", "No status change")}

# Brixia zone -> (zone of lung, laterality)
ZONE_SITES = {
    "A": (codes.SCT.UpperZoneOfLung, codes.SCT.Right), "B": (codes.SCT.MiddleZoneOfLung, codes.SCT.Right),
    "C": (codes.SCT.LowerZoneOfLung, codes.SCT.Right), "D": (codes.SCT.UpperZoneOfLung, codes.SCT.Left),
    "E": (codes.SCT.MiddleZoneOfLung, codes.SCT.Left), "F": (codes.SCT.LowerZoneOfLung, codes.SCT.Left),
}


def private_scheme_identification() -> pydicom.Dataset:
    """The Coding Scheme Identification item that declares the private designator."""
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "cxr-node private codes"
    item.CodingSchemeResponsibleOrganization = "cxr-node"
    return item
