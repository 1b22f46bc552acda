"""H.264 Annex B byte-stream helpers: find NAL units, split a stream into access units, tell an
IDR access unit and one that carries its parameter sets. Only what the cameras and the sim need;
decoding is PyAV's job."""

from __future__ import annotations

NAL_IDR = 5
NAL_SEI = 6
NAL_SPS = 7
NAL_PPS = 8
NAL_AUD = 9
START_CODE = b"\x00\x00\x00\x01"
VCL = frozenset(range(1, 6))  # coded slice NAL unit types
# Non-VCL types that may only appear before the first slice of an access unit (H.264 7.4.1.2.3):
# SEI, SPS, PPS, access unit delimiter, and the reserved/prefix types 14..18.
AU_PREFIX = frozenset({6, 7, 8, 9, 14, 15, 16, 17, 18})


def nal_starts(data: bytes) -> list[tuple[int, int]]:
    """(start code offset, NAL header offset) of every NAL unit in an Annex B buffer."""
    out = []
    i = data.find(b"\x00\x00\x01")
    while i >= 0:
        # A 4-byte start code (00 00 00 01) belongs to the NAL it introduces, not to the
        # trailing bytes of the previous one.
        out.append((i - 1 if i > 0 and data[i - 1] == 0 else i, i + 3))
        i = data.find(b"\x00\x00\x01", i + 3)
    return out


def nal_units(data: bytes) -> list[tuple[int, bytes]]:
    """(type, NAL unit with its start code) for each NAL unit of an Annex B buffer."""
    starts = nal_starts(data)
    units = []
    for k, (sc, hdr) in enumerate(starts):
        if hdr >= len(data):
            break
        end = starts[k + 1][0] if k + 1 < len(starts) else len(data)
        units.append((data[hdr] & 0x1F, data[sc:end]))
    return units


def nal_types(access_unit: bytes) -> set[int]:
    return {access_unit[h] & 0x1F for _, h in nal_starts(access_unit) if h < len(access_unit)}


def is_idr(access_unit: bytes) -> bool:
    """Whether the access unit holds an IDR slice (a keyframe that decodes on its own)."""
    return NAL_IDR in nal_types(access_unit)


def has_parameter_sets(access_unit: bytes) -> bool:
    return {NAL_SPS, NAL_PPS} <= nal_types(access_unit)


def split_access_units(stream: bytes) -> list[bytes]:
    """Split an Annex B H.264 elementary stream into access units, byte-exact.

    A new access unit starts at an SPS/PPS/SEI/AUD that follows a slice, or at a slice whose
    first_mb_in_slice is 0 (its ue(v) code is the single bit 1) that follows a slice; this is
    the first-slice detection of H.264 7.4.1.2.4, enough for encoder output with one or many
    slices per picture.
    """
    nals = nal_starts(stream)
    if not nals or nals[0][0] != 0:
        raise ValueError("not an Annex B stream: it does not begin with a start code")
    units: list[bytes] = []
    au_start = 0
    seen_slice = False
    for sc, hdr in nals:
        if hdr >= len(stream):
            break
        nal_type = stream[hdr] & 0x1F
        first_slice = nal_type in VCL and hdr + 1 < len(stream) and stream[hdr + 1] & 0x80
        if seen_slice and (nal_type in AU_PREFIX or first_slice):
            units.append(stream[au_start:sc])
            au_start = sc
            seen_slice = False
        if nal_type in VCL:
            seen_slice = True
    units.append(stream[au_start:])
    return units
