"""The demo's bundled sample crawl: a WAT and a WARC (and a plain WARC) of a small multilingual site.

Pages live on a loopback "site" (``site_base_url``) whose images are the synthetic shapes of
:mod:`laion_spark.testing.synthetic`, served by the demo's image server at ``/img/{kind.slug}-{seed}.jpg``. The
mix is what extraction and the later stages should see in a real crawl: good alt texts (English captions and
their translations), junk alts (file names, "logo"), empty and missing alts, mismatched captions for CLIP to
drop, duplicates across pages and across files, relative URLs, ``<base href>``, and pages in legacy charsets.
Everything is derived from a fixed seed, so the sample is the same on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from laion_spark.testing.archives import HtmlPage, WatPage, write_warc, write_wat
from laion_spark.testing.synthetic import SyntheticImage, all_kinds

SEED = 400
CRAWL_DATE = "2024-05-04T10:20:30Z"

# Caption templates per language and the words they take; English is SyntheticImage.caption itself.
TRANSLATIONS: dict[str, dict] = {
    "de": {
        "template": "{shape} in {color} auf {background} Hintergrund",
        "color": dict(
            red="Rot",
            green="Grün",
            blue="Blau",
            yellow="Gelb",
            purple="Lila",
            orange="Orange",
            black="Schwarz",
            white="Weiß",
        ),
        "shape": dict(
            circle="Ein Kreis",
            square="Ein Quadrat",
            triangle="Ein Dreieck",
            star="Ein Stern",
            stripes="Streifen",
            cross="Ein Kreuz",
        ),
        "background": {"gray": "grauem", "pale blue": "hellblauem", "beige": "beigem"},
    },
    "fr": {
        "template": "{shape} de couleur {color} sur fond {background}",
        "color": dict(
            red="rouge",
            green="vert",
            blue="bleu",
            yellow="jaune",
            purple="violet",
            orange="orange",
            black="noir",
            white="blanc",
        ),
        "shape": dict(
            circle="Un cercle",
            square="Un carré",
            triangle="Un triangle",
            star="Une étoile",
            stripes="Des rayures",
            cross="Une croix",
        ),
        "background": {"gray": "gris", "pale blue": "bleu pâle", "beige": "beige"},
    },
    "es": {
        "template": "{shape} de color {color} sobre fondo {background}",
        "color": dict(
            red="rojo",
            green="verde",
            blue="azul",
            yellow="amarillo",
            purple="morado",
            orange="naranja",
            black="negro",
            white="blanco",
        ),
        "shape": dict(
            circle="Un círculo",
            square="Un cuadrado",
            triangle="Un triángulo",
            star="Una estrella",
            stripes="Unas rayas",
            cross="Una cruz",
        ),
        "background": {"gray": "gris", "pale blue": "azul pálido", "beige": "beige"},
    },
    "it": {
        "template": "{shape} di colore {color} su sfondo {background}",
        "color": dict(
            red="rosso",
            green="verde",
            blue="blu",
            yellow="giallo",
            purple="viola",
            orange="arancione",
            black="nero",
            white="bianco",
        ),
        "shape": dict(
            circle="Un cerchio",
            square="Un quadrato",
            triangle="Un triangolo",
            star="Una stella",
            stripes="Delle strisce",
            cross="Una croce",
        ),
        "background": {"gray": "grigio", "pale blue": "azzurro chiaro", "beige": "beige"},
    },
    "pt": {
        "template": "{shape} de cor {color} sobre fundo {background}",
        "color": dict(
            red="vermelho",
            green="verde",
            blue="azul",
            yellow="amarelo",
            purple="roxo",
            orange="laranja",
            black="preto",
            white="branco",
        ),
        "shape": dict(
            circle="Um círculo",
            square="Um quadrado",
            triangle="Um triângulo",
            star="Uma estrela",
            stripes="Listras",
            cross="Uma cruz",
        ),
        "background": {"gray": "cinza", "pale blue": "azul-claro", "beige": "bege"},
    },
    "nl": {
        "template": "{shape} in het {color} op een {background} achtergrond",
        "color": dict(
            red="rood",
            green="groen",
            blue="blauw",
            yellow="geel",
            purple="paars",
            orange="oranje",
            black="zwart",
            white="wit",
        ),
        "shape": dict(
            circle="Een cirkel",
            square="Een vierkant",
            triangle="Een driehoek",
            star="Een ster",
            stripes="Strepen",
            cross="Een kruis",
        ),
        "background": {"gray": "grijze", "pale blue": "lichtblauwe", "beige": "beige"},
    },
    "ru": {
        "template": "{shape} {color} цвета на {background} фоне",
        "color": dict(
            red="красного",
            green="зелёного",
            blue="синего",
            yellow="жёлтого",
            purple="фиолетового",
            orange="оранжевого",
            black="чёрного",
            white="белого",
        ),
        "shape": dict(
            circle="Круг", square="Квадрат", triangle="Треугольник", star="Звезда", stripes="Полосы", cross="Крест"
        ),
        "background": {"gray": "сером", "pale blue": "бледно-голубом", "beige": "бежевом"},
    },
    "ja": {
        "template": "{background}の背景に{color}の{shape}",
        "color": dict(
            red="赤", green="緑", blue="青", yellow="黄色", purple="紫", orange="オレンジ", black="黒", white="白"
        ),
        "shape": dict(circle="円", square="正方形", triangle="三角形", star="星", stripes="縞模様", cross="十字"),
        "background": {"gray": "灰色", "pale blue": "淡い青", "beige": "ベージュ"},
    },
    "zh": {
        "template": "{background}背景上的{color}{shape}",
        "color": dict(
            red="红色",
            green="绿色",
            blue="蓝色",
            yellow="黄色",
            purple="紫色",
            orange="橙色",
            black="黑色",
            white="白色",
        ),
        "shape": dict(circle="圆形", square="正方形", triangle="三角形", star="星形", stripes="条纹", cross="十字"),
        "background": {"gray": "灰色", "pale blue": "淡蓝色", "beige": "米色"},
    },
}
LANGUAGES = ["en", *TRANSLATIONS]
ENGLISH_PARAPHRASES = [
    "{caption}",
    "{caption}",
    "A {color} {shape} against a {background} backdrop",
    "Photo of a {color} {shape} on a plain {background} background",
]
JUNK_ALTS = ["IMG_2034.jpg", "DSC01234", "logo", "image", "photo", "banner", "thumbnail", "untitled"]
# Legacy charsets for some WARC pages, declared in the HTTP header or only in <meta>.
PAGE_CHARSETS = {"de": ("iso-8859-1", "header"), "ru": ("windows-1251", "meta"), "ja": ("shift_jis", "meta")}
PAGE_TITLES = {
    "en": "Shapes gallery",
    "de": "Formen-Galerie",
    "fr": "Galerie de formes",
    "es": "Galería de formas",
    "it": "Galleria di forme",
    "pt": "Galeria de formas",
    "nl": "Vormengalerij",
    "ru": "Галерея фигур",
    "ja": "図形ギャラリー",
    "zh": "图形画廊",
}


def caption_in(language: str, kind: SyntheticImage, rng: random.Random | None = None) -> str:
    """``kind``'s caption in ``language`` (for English, the caption itself or a close paraphrase)."""
    if language == "en":
        template = rng.choice(ENGLISH_PARAPHRASES) if rng else "{caption}"
        return template.format(caption=kind.caption, color=kind.color, shape=kind.shape, background=kind.background)
    words = TRANSLATIONS[language]
    return words["template"].format(
        shape=words["shape"][kind.shape],
        color=words["color"][kind.color],
        background=words["background"][kind.background],
    )


@dataclass
class SamplePage:
    url: str
    language: str
    images: list[tuple[str, str | None]]  # (src as written in the page, alt or None for no attribute)
    base_href: str | None = None


def write_sample_crawl(directory: Path, site_base_url: str) -> list[Path]:
    """Write ``sample.wat.gz``, ``sample.warc.gz`` and ``sample-extra.warc`` into ``directory``; return them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    site = site_base_url.rstrip("/")
    pages = _sample_pages(site, random.Random(SEED))
    # Most pages go to one file; every seventh page is in both, as when two crawls overlap.
    wat_pages = [p for i, p in enumerate(pages) if i % 2 == 0 or i % 7 == 0]
    warc_pages = [p for i, p in enumerate(pages) if (i % 2 == 1 or i % 7 == 0) and i % 5 != 3]
    extra_pages = [p for i, p in enumerate(pages) if i % 2 == 1 and i % 5 == 3]
    return [
        _write_wat(directory / "sample.wat.gz", wat_pages),
        _write_warc(directory / "sample.warc.gz", warc_pages),
        _write_warc(directory / "sample-extra.warc", extra_pages),
    ]


def _sample_pages(site: str, rng: random.Random) -> list[SamplePage]:
    kinds = all_kinds()
    shared_kind = kinds[0]  # the same image and alt on many pages (a site-wide banner picture)
    pages = []
    for number in range(110):
        language = LANGUAGES[number % len(LANGUAGES)]
        page_url = f"{site}/{language}/gallery/page-{number}.html"
        use_base = number % 6 == 0
        images = []
        for _ in range(rng.randint(3, 7)):
            kind = rng.choice(kinds)
            file_name = f"{kind.slug}-{rng.randint(0, 4)}.jpg"
            roll = rng.random()
            if roll < 0.55:
                alt = caption_in(language, kind, rng)
            elif roll < 0.65:
                alt = caption_in(language, rng.choice([k for k in kinds if k.shape != kind.shape]), rng)  # mismatched
            elif roll < 0.80:
                alt = rng.choice(JUNK_ALTS)
            elif roll < 0.90:
                alt = ""
            else:
                alt = None
            images.append((_src(site, file_name, use_base, rng), alt))
        if number % 4 == 0:
            images.append((_src(site, f"{shared_kind.slug}-0.jpg", use_base, rng), caption_in(language, shared_kind)))
        if number % 9 == 0:
            images.append(("data:image/gif;base64,R0lGODlhAQABAAAAACw=", "a tracking pixel"))
        pages.append(SamplePage(page_url, language, images, f"{site}/img/" if use_base else None))
    return pages


def _src(site: str, file_name: str, use_base: bool, rng: random.Random) -> str:
    if use_base:
        return file_name  # resolved against <base href="{site}/img/">
    return rng.choice([f"{site}/img/{file_name}", f"/img/{file_name}", f"../../img/{file_name}"])


def _page_html(page: SamplePage, charset: str, charset_in_meta: bool) -> str:
    head = [f"<title>{PAGE_TITLES[page.language]}</title>"]
    if charset_in_meta:
        head.insert(0, f'<meta http-equiv="Content-Type" content="text/html; charset={charset}">')
    if page.base_href:
        head.append(f'<base href="{page.base_href}">')
    body = []
    for src, alt in page.images:
        alt_attribute = "" if alt is None else f' alt="{_escape(alt)}"'
        tag = "IMG" if len(body) % 5 == 4 else "img"  # old pages still have uppercase tags
        body.append(f'<figure><{tag} src="{src}"{alt_attribute} width="320" height="320"></figure>')
    return (
        f'<!DOCTYPE html><html lang="{page.language}"><head>{"".join(head)}</head>'
        f'<body><h1>{PAGE_TITLES[page.language]}</h1>{"".join(body)}<p><a href="/">Home</a></p></body></html>'
    )


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def _write_warc(path: Path, pages: list[SamplePage]) -> Path:
    html_pages = []
    for page in pages:
        charset, where = PAGE_CHARSETS.get(page.language, ("utf-8", "header"))
        body = _page_html(page, charset, where == "meta").encode(charset)
        content_type = f"text/html; charset={charset}" if where == "header" else "text/html"
        html_pages.append(HtmlPage(page.url, body, content_type, CRAWL_DATE))
    return write_warc(path, html_pages)


def _write_wat(path: Path, pages: list[SamplePage]) -> Path:
    return write_wat(path, [WatPage(p.url, p.images, base=p.base_href, date=CRAWL_DATE) for p in pages])
