"""The result shapes of the reserved task names (PROTOCOL.md, "Tasks and their results").

pydantic models used for their JSON Schema (``GET /v1/tasks``) and by tests to check answers;
tasks build plain dicts. Boxes are ``[x0, y0, x1, y1]`` in ORIGINAL image pixels.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

BoxField = Field(min_length=4, max_length=4,
                 description="[x0, y0, x1, y1] in pixels of the original image")
ScoreField = Field(ge=0.0, le=1.0)


class Label(BaseModel):
    label: str
    score: float = ScoreField


class Labels(BaseModel):
    """``classify``, ``zero-shot``: best first."""

    labels: list[Label]


class DetectedObject(BaseModel):
    label: str
    score: float = ScoreField
    box: list[float] = BoxField


class Objects(BaseModel):
    """``detect``."""

    objects: list[DetectedObject]


class TextLine(BaseModel):
    text: str
    score: float = ScoreField
    box: list[float] = BoxField


class Text(BaseModel):
    """``ocr``: lines in reading order; ``text`` joins them with newlines."""

    text: str
    lines: list[TextLine]


class Face(BaseModel):
    score: float = ScoreField
    box: list[float] = BoxField


class Faces(BaseModel):
    """``faces``."""

    faces: list[Face]


class Code(BaseModel):
    format: str = Field(description="QR_CODE, EAN_13, CODE_128, ...")
    text: str
    box: list[float] = BoxField


class Codes(BaseModel):
    """``codes``: QR codes and barcodes."""

    codes: list[Code]


class Moderation(BaseModel):
    """``moderate``."""

    nsfw: float = ScoreField


class Caption(BaseModel):
    """``caption``."""

    caption: str


class Embedding(BaseModel):
    """``embed``: the same length for every image of one model."""

    embedding: list[float]


class Color(BaseModel):
    hex: str = Field(pattern=r"^#[0-9a-f]{6}$")
    fraction: float = ScoreField


class Palette(BaseModel):
    """``colors``: dominant colours, most common first, and the mean brightness."""

    colors: list[Color]
    brightness: float = ScoreField
