"""Coffee-shop menus: drinks x sizes with prices, pots of tea, add-ons; questions on one price, an add-on, a sum."""

from __future__ import annotations

import random

from .render import QA, SynthConfig, Style, article, font, money, render, text_size, wrong

HAS_TEXT = True
# Label words, partitioned: test-novel menus use only the "novel" half.
VOCAB = {
    "train": {
        "items": ("Latte", "Cappuccino", "Mocha", "Americano", "Espresso", "Flat White", "Macchiato", "Chai Latte",
                  "Hot Chocolate", "Cold Brew", "Iced Latte", "Caramel Latte", "Drip Coffee", "London Fog"),
        "teas": ("Earl Grey", "Green Tea", "Jasmine", "Chamomile", "Peppermint"),
        # (label as printed, noun phrase in the question "How much is {phrase}?")
        "addons": (("Add ice", "it to add ice"), ("Extra shot", "an extra shot"), ("Oat milk", "oat milk"),
                   ("Whipped cream", "whipped cream"), ("Vanilla syrup", "vanilla syrup"), ("Soy milk", "soy milk")),
        "titles": ("Harbor Coffee", "The Daily Grind", "Bean There", "Corner Cafe", "Morning Cup", "Brew House",
                   "Little Roast", "Cafe Central"),
    },
    "novel": {
        "items": ("Cortado", "Affogato", "Matcha Latte", "Red Eye", "Breve", "Ristretto", "Lungo", "Iced Mocha",
                  "Vienna Coffee", "Turmeric Latte"),
        "teas": ("Oolong", "Darjeeling", "Rooibos", "Assam"),
        "addons": (("Add honey", "it to add honey"), ("Almond milk", "almond milk"),
                   ("Caramel drizzle", "caramel drizzle"), ("Cinnamon", "cinnamon")),
        "titles": ("Blue Kettle", "Copper Mug", "Night Owl Cafe", "Steam & Co"),
    },
}
# (size words used in questions, size labels printed in the header)
SIZE_SCHEMES = (
    (("small", "medium", "large"), ("Small", "Medium", "Large")),
    (("small", "medium", "large"), ("S", "M", "L")),
    (("small", "large"), ("Small", "Large")),
    (("regular", "large"), ("Regular", "Large")),
    (("8 oz", "12 oz", "16 oz"), ("8 oz", "12 oz", "16 oz")),
)


def facts(rng: random.Random, vocab: str, cfg: SynthConfig) -> dict:
    v = VOCAB[vocab]
    words, labels = rng.choice(SIZE_SCHEMES)
    n_teas = rng.choice((0, 0, 1, 2))
    n_items = max(1, rng.randint(cfg.min_items, cfg.max_items) - n_teas)
    items = []
    for name in rng.sample(v["items"], n_items):
        cents, step = rng.randrange(200, 500, 25), rng.choice((25, 50, 75))
        items.append({"name": name, "prices": [money(cents + i * step) for i in range(len(words))]})
    teas = [{"name": name, "price": money(rng.randrange(350, 700, 25))} for name in rng.sample(v["teas"], n_teas)]
    addons = [{"label": label, "phrase": phrase, "price": money(rng.randrange(25, 150, 5))}
              for label, phrase in rng.sample(v["addons"], rng.randint(1, 3))]
    return {"title": rng.choice(v["titles"]), "sizes": list(words), "size_labels": list(labels), "items": items,
            "teas": teas, "addons": addons, "layout": rng.choice(("grid", "stacked"))}


def lines(f: dict) -> list[str]:
    """The menu's text in reading order, one printed line each."""
    out = [f["title"]]
    if f["layout"] == "grid":
        out.append(" ".join(f["size_labels"]))
        out += [" ".join([i["name"], *i["prices"]]) for i in f["items"]]
    else:
        for i in f["items"]:
            out += [i["name"], " ".join(f"{s} {p}" for s, p in zip(f["size_labels"], i["prices"]))]
    if f["teas"]:
        out += ["Pots of tea"] + [f"{t['name']} {t['price']}" for t in f["teas"]]
    out += [f"{a['label']} +{a['price']}" for a in f["addons"]]
    return out


def draw(f: dict, style: Style, rng: random.Random, cfg: SynthConfig):
    ink, accent = style.palette.ink, style.palette.accent

    def layout(cap: int):
        body, head = font(style.font, cap), font(style.font, int(cap * 1.4))
        gap, row = cap * 2, int(text_size(body, "Hg")[1] * 1.3)
        name_w = max(text_size(body, n)[0] for n in [i["name"] for i in f["items"]] + [t["name"] for t in f["teas"]]
                     + ["Pots of tea"])
        price_w = max(text_size(body, s)[0] for s in ["$00.00", *f["size_labels"]])
        if f["layout"] == "grid":
            width = name_w + len(f["sizes"]) * (price_w + gap)
        else:
            width = max(name_w, sum(text_size(body, f"{s} $0.00")[0] + gap for s in f["size_labels"]))
        addon_texts = [f"{a['label']} +{a['price']}" for a in f["addons"]]
        width = max([width, text_size(head, f["title"])[0]] + [text_size(body, t)[0] for t in addon_texts])
        ops, y = [], 0
        title_w = text_size(head, f["title"])[0]
        x = {"left": 0, "center": (width - title_w) // 2, "right": width - title_w}[style.align]
        ops.append(("text", x, y, f["title"], head, accent))
        y += int(text_size(head, "Hg")[1] * 1.5)
        cols = [name_w + gap + k * (price_w + gap) for k in range(len(f["sizes"]))]  # left edge of each price column
        if f["layout"] == "grid":
            for c, label in zip(cols, f["size_labels"]):
                ops.append(("text", c + price_w - text_size(body, label)[0], y, label, body, accent))
            y += row
            for item in f["items"]:
                ops.append(("text", 0, y, item["name"], body, ink))
                for c, p in zip(cols, item["prices"]):
                    ops.append(("text", c + price_w - text_size(body, p)[0], y, p, body, ink))
                y += row
        else:
            for item in f["items"]:
                ops.append(("text", 0, y, item["name"], body, ink))
                y += row
                x = cap
                for s, p in zip(f["size_labels"], item["prices"]):
                    ops.append(("text", x, y, f"{s} {p}", body, ink))
                    x += text_size(body, f"{s} $0.00")[0] + gap
                y += int(row * 1.2)
        if f["teas"]:
            y += row // 3
            ops.append(("text", 0, y, "Pots of tea", body, accent))
            y += row
            for t in f["teas"]:
                ops.append(("text", 0, y, t["name"], body, ink))
                ops.append(("text", width - text_size(body, t["price"])[0], y, t["price"], body, ink))
                y += row
        y += row // 3
        ops.append(("line", [(0, y), (width, y)], accent, max(1, cap // 10)))
        y += row // 3
        for t in addon_texts:
            ops.append(("text", 0, y, t, body, ink))
            y += row
        return ops, (width, y)

    return render(layout, style, rng, cfg)


def questions(f: dict, rng: random.Random) -> list[QA]:
    sizes, items = f["sizes"], f["items"]
    out = []
    item, s = rng.choice(items), rng.randrange(len(sizes))
    ans = item["prices"][s]
    others = [p for k, p in enumerate(item["prices"]) if k != s] + [i["prices"][s] for i in items if i is not item]
    out.append(QA("price", f"How much is {article(sizes[s] + ' ' + item['name'].lower())}?", ans, _variants(ans),
                  wrong(ans, others, _shift(ans, 50))))
    addon = rng.choice(f["addons"])
    ans = addon["price"]
    others = [a["price"] for a in f["addons"] if a is not addon] + [_shift(ans, 25)]
    out.append(QA("addon", f"How much is {addon['phrase']}?", ans, _variants(ans), wrong(ans, others, _shift(ans, 25))))
    if f["teas"] and rng.random() < 0.5:
        tea = rng.choice(f["teas"])
        ans = tea["price"]
        others = [t["price"] for t in f["teas"] if t is not tea] + [i["prices"][0] for i in items]
        out.append(QA("price", f"How much is a pot of {tea['name']}?", ans, _variants(ans),
                      wrong(ans, others, _shift(ans, 50))))
    if len(items) >= 2 or len(sizes) >= 2:
        picks = rng.sample([(i, k) for i in range(len(items)) for k in range(len(sizes))], 2)
        (a, sa), (b, sb) = picks
        cents = _cents(items[a]["prices"][sa]) + _cents(items[b]["prices"][sb])
        ans = money(cents)
        alt = [money(_cents(items[a]["prices"][k]) + _cents(items[b]["prices"][sb])) for k in range(len(sizes))]
        q = (f"How much are {article(sizes[sa] + ' ' + items[a]['name'].lower())} and "
             f"{article(sizes[sb] + ' ' + items[b]['name'].lower())} together?")
        out.append(QA("sum", q, ans, _variants(ans), wrong(ans, alt, money(cents + 50))))
    return out


def caption(f: dict) -> str:
    names = ", ".join(f"{i['name']} ({' / '.join(i['prices'])})" for i in f["items"])
    sizes = ", ".join(f["sizes"])
    text = f"A coffee menu from {f['title']} listing {names} in sizes {sizes}"
    if f["teas"]:
        text += "; pots of tea: " + ", ".join(f"{t['name']} ({t['price']})" for t in f["teas"])
    return text + "; add-ons: " + ", ".join(f"{a['label']} (+{a['price']})" for a in f["addons"]) + "."


def _cents(price: str) -> int:
    dollars, cents = price[1:].split(".")
    return int(dollars) * 100 + int(cents)


def _shift(price: str, delta: int) -> str:
    return money(_cents(price) + delta)


def _variants(price: str) -> tuple[str, ...]:
    return (price, price[1:])
