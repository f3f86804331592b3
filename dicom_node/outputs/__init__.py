"""DICOM objects the node sends back for a frontal chest radiograph, in the spirit of highdicom's
split: `codes` (coded concepts), `identity` (UIDs, algorithm, shared header), `source` (the source
header, projection geometry and calibration), `segments` (the one segment table), and one builder per
object: `seg` (DICOM SEG), `sr` (TID 1500 Measurement Report), `capture` (optional Secondary Capture)."""
