"""A picture of a slide's ``report.html``, for documents that cannot embed HTML (the README).

Usage::

    python -m pysynth.bench.report_picture results/<slide>/report.html docs/report.jpg

The page is read as it is: its embedded pictures (in their order: thumbnail, density maps, crops), their captions,
its title line and its tables are laid out on one figure in the page's order. Nothing is recomputed, so the picture
shows what the page shows.
"""

from __future__ import annotations

import argparse
import base64
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np


@dataclass
class Page:
    """What a report page holds, in page order."""

    title: str = ""
    subtitle: str = ""
    figures: list[tuple[np.ndarray, str]] = field(default_factory=list)  # (RGB, caption)
    tables: list[tuple[str, list[list[str]]]] = field(default_factory=list)  # (heading, rows of cells)


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.page = Page()
        self._tag: list[str] = []
        self._text: list[str] = []
        self._heading = ""
        self._rows: list[list[str]] | None = None
        self._image: np.ndarray | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag.append(tag)
        if tag in ("h1", "h2", "td", "th", "figcaption") or (tag == "div" and ("class", "sub") in attrs):
            self._text = []
        if tag == "table":
            self._rows = []
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag == "img":
            src = dict(attrs).get("src") or ""
            if src.startswith("data:image/"):
                data = np.frombuffer(base64.b64decode(src.split(",", 1)[1]), np.uint8)
                self._image = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

    def handle_data(self, data: str) -> None:
        self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        text = " ".join("".join(self._text).split())
        if tag == "h1":
            self.page.title = text
        elif tag == "h2":
            self._heading = text
        elif tag == "div" and not self.page.subtitle and self.page.title and text:
            self.page.subtitle = text
        elif tag in ("td", "th") and self._rows:
            self._rows[-1].append(text)
        elif tag == "table" and self._rows is not None:
            self.page.tables.append((self._heading, self._rows))
            self._rows = None
        elif tag == "figcaption" and self._image is not None:
            self.page.figures.append((self._image, text))
            self._image = None
        if self._tag:
            self._tag.pop()


def read_page(path: Path) -> Page:
    """The title, pictures with captions and tables of a ``report.html``."""
    reader = _Reader()
    reader.feed(path.read_text(encoding="utf-8"))
    return reader.page


def draw(page: Page, out: Path, width: int = 1600) -> None:
    """Lay the page out on one picture: maps and tables above, the full-resolution crops below (Pillow)."""
    from PIL import Image, ImageDraw, ImageFont

    try:  # a system font with µ and ² where there is one (DejaVu Sans on most Linux systems)
        ImageFont.truetype("DejaVuSans.ttf", 12)
        face: str | None = "DejaVuSans.ttf"
    except OSError:
        face = None

    def font(size: int):
        return ImageFont.truetype(face, size) if face else ImageFont.load_default(size=size)

    def text(s: str) -> str:  # Pillow's own font has no µ, ² or ≥
        if face:
            return s
        return s.replace("≥", ">=").replace("–", "-").replace("µm", "um").replace("²", "2")

    maps = [f for f in page.figures if "µm wide" not in f[1]]
    crops = [f for f in page.figures if "µm wide" in f[1]]
    gap, caption_h, pad = 14, 22, 16
    row_h = 330
    scaled = [(rgb, cap, round(rgb.shape[1] * row_h / rgb.shape[0])) for rgb, cap in maps]
    crop_w = (width - 2 * pad - gap * (max(len(crops), 1) - 1)) // max(len(crops), 1)
    lines: list[str] = []
    for heading, rows in page.tables:
        lines.append(heading)
        lines += ["   " + "    ".join(cell for cell in row if cell) for row in rows]
        lines.append("")
    title_h = 64
    height = pad + title_h + row_h + caption_h + gap + crop_w + caption_h + pad
    canvas = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(canvas)
    pen.text((pad, pad), text(page.title), fill=(20, 20, 20), font=font(24))
    pen.text((pad, pad + 32), text(page.subtitle), fill=(100, 100, 100), font=font(14))
    x, y = pad, pad + title_h
    for rgb, cap, w in scaled:
        canvas.paste(Image.fromarray(rgb).resize((w, row_h), Image.LANCZOS), (x, y))
        pen.text((x, y + row_h + 3), text(cap), fill=(80, 80, 80), font=font(14))
        x += w + gap
    pen.multiline_text((x + 8, y), text("\n".join(lines)), fill=(30, 30, 30), font=font(14), spacing=3)
    x, y = pad, pad + title_h + row_h + caption_h + gap
    for rgb, cap in crops:
        canvas.paste(Image.fromarray(rgb).resize((crop_w, crop_w), Image.LANCZOS), (x, y))
        pen.text((x, y + crop_w + 3), text(cap), fill=(80, 80, 80), font=font(13))
        x += crop_w + gap
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, **({"quality": 88} if out.suffix.lower() in (".jpg", ".jpeg") else {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="a slide's report.html")
    parser.add_argument("out", type=Path, help="the picture (.png or .jpg)")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        parser.exit(1, f"error: {args.report}: no such report\n")
    page = read_page(args.report)
    if not page.figures:
        parser.exit(1, f"error: {args.report}: not a pysynth report (no embedded pictures)\n")
    draw(page, args.out)
    print(f"{args.out}: {len(page.figures)} picture(s), {len(page.tables)} table(s) of {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
