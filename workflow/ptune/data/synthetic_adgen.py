"""An ADGEN-shaped dataset generated from a seed: attribute lists and ad copy that depends on them.

Each attribute has several phrasings, and the copy mentions the values themselves, so a model scores well only
by reading the `content` and copying its values into fluent text. The data set follows one house style (a few
phrasings per attribute, attributes in list order); the embedded base is pre-trained on plain product text in
a looser style over other attribute lists. Learning the house style and the prompt is what P-tuning adds.
Keys and values follow the real ADGEN (`类型#上衣*材质#牛仔布*颜色#白色*...`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

# Attribute keys per garment type, and the values each key takes (as in ADGEN).
VALUES: dict[str, list[str]] = {
    "材质": ["棉", "牛仔布", "针织", "雪纺", "蕾丝", "羊毛", "真丝", "亚麻", "涤纶", "网纱"],
    "颜色": ["白色", "黑色", "红色", "蓝色", "粉色", "绿色", "黄色", "灰色", "卡其色", "杏色"],
    "风格": ["简约", "复古", "文艺", "休闲", "通勤", "街头", "甜美", "性感", "清新", "学院"],
    "图案": ["刺绣", "条纹", "格子", "印花", "碎花", "波点", "字母", "纯色", "线条", "撞色"],
    "衣样式": ["外套", "衬衫", "卫衣", "T恤", "毛衣", "风衣", "夹克", "西装", "针织衫", "马甲"],
    "衣款式": ["破洞", "口袋", "拼接", "纽扣", "拉链", "荷叶边", "系带", "露肩", "不规则", "开叉"],
    "衣领型": ["圆领", "v领", "翻领", "立领", "连帽", "高领", "一字领", "娃娃领"],
    "衣袖型": ["泡泡袖", "灯笼袖", "蝙蝠袖", "喇叭袖", "落肩袖", "插肩袖"],
    "版型": ["宽松", "修身", "显瘦", "直筒", "a字", "oversize"],
    "裙型": ["a字裙", "百褶裙", "包臀裙", "鱼尾裙", "蛋糕裙", "直筒裙", "一步裙"],
    "裙长": ["短裙", "中长裙", "长裙", "连衣裙", "半身裙"],
    "裙领型": ["圆领", "v领", "方领", "半高领", "一字领", "翻领"],
    "裙款式": ["腰带", "拼接", "抽褶", "收腰", "开叉", "绑带", "纽扣"],
    "裤长": ["九分裤", "七分裤", "长裤", "短裤", "五分裤"],
    "裤型": ["阔腿裤", "直筒裤", "哈伦裤", "小脚裤", "喇叭裤", "工装裤", "灯笼裤"],
    "裤款式": ["破洞", "口袋", "拉链", "抽绳", "毛边", "卷边", "松紧"],
    "裤腰型": ["高腰", "中腰", "松紧腰", "低腰"],
}
KEYS_BY_TYPE: dict[str, list[str]] = {
    "上衣": ["材质", "颜色", "风格", "图案", "衣样式", "衣款式", "衣领型", "衣袖型", "版型"],
    "裙": ["材质", "颜色", "风格", "图案", "裙型", "裙长", "裙领型", "裙款式", "版型"],
    "裤": ["材质", "颜色", "风格", "图案", "裤长", "裤型", "裤款式", "裤腰型", "版型"],
}

# Several phrasings per key; {v} is the value. The first three are ADGEN's house style, used by the data
# set; pre-training text (the "plain" style) also uses the last two, as other shops' copy would.
PHRASES: dict[str, list[str]] = {
    "材质": [
        "采用{v}面料，亲肤透气",
        "{v}材质柔软舒适，穿着没有束缚感",
        "选用优质{v}，手感细腻",
        "面料是{v}的",
        "{v}做的，很舒服",
    ],
    "颜色": ["{v}的配色干净大方", "经典的{v}十分百搭", "{v}的色调显得格外温柔", "颜色是{v}", "有{v}可选"],
    "风格": ["整体是{v}风格，轻松穿出品味", "带来满满的{v}气息", "{v}的设计感十足", "属于{v}风", "走{v}路线"],
    "图案": [
        "{v}图案点缀其间，增添看点",
        "衣身饰有{v}元素，彰显个性",
        "精致的{v}设计，丰富层次感",
        "图案是{v}",
        "有{v}花样",
    ],
    "衣样式": ["这款{v}", "这件{v}", "一款时髦的{v}", "{v}一件", "新款{v}"],
    "衣款式": ["{v}的细节别出心裁", "加入{v}设计，打破单调", "独特的{v}处理，时尚有趣", "带{v}", "做了{v}"],
    "衣领型": ["{v}的设计修饰脸型", "简洁的{v}衬托气质", "{v}领口利落有型", "领子是{v}", "{v}款"],
    "衣袖型": ["{v}的设计增添灵动感", "搭配{v}，遮肉又显瘦", "{v}造型俏皮可爱", "袖子是{v}", "{v}款式"],
    "版型": ["{v}的版型包容性强", "{v}剪裁，穿着舒适自在", "采用{v}版型，修饰身材", "版型{v}", "{v}版"],
    "裙型": ["这款{v}", "这条{v}", "一款优雅的{v}", "{v}一条", "新款{v}"],
    "裙长": ["{v}的长度恰到好处", "设计成{v}，行走间飘逸灵动", "{v}的款式适合多种场合", "长度是{v}", "属于{v}"],
    "裙领型": ["{v}的设计展现颈部线条", "精致的{v}尽显温柔", "{v}领口显得落落大方", "领子是{v}", "{v}款"],
    "裙款式": ["{v}的设计勾勒腰身", "加入{v}细节，凸显女人味", "{v}点缀，甜美又别致", "带{v}", "做了{v}"],
    "裤长": ["{v}的长度露出脚踝", "设计成{v}，显高又利落", "{v}的款式清爽干练", "长度是{v}", "属于{v}"],
    "裤型": ["这款{v}", "这条{v}", "一条百搭的{v}", "{v}一条", "新款{v}"],
    "裤款式": ["{v}的细节增添街头感", "加入{v}设计，个性十足", "{v}处理，随性又时髦", "带{v}", "做了{v}"],
    "裤腰型": ["{v}的设计拉长腿部比例", "{v}设计，穿着舒适不勒", "采用{v}，显瘦又显高", "腰型是{v}", "{v}款"],
}
HOUSE_PHRASES = 3
# The key that names the garment itself opens the copy.
NAMING_KEY = {"上衣": "衣样式", "裙": "裙型", "裤": "裤型"}
CLOSERS = ["，日常穿着十分百搭。", "，轻松打造时尚造型。", "，展现独特魅力。", "，让你美美出街。"]
PLAIN_CLOSERS = CLOSERS + ["。", "，欢迎选购。", "，性价比高。"]
STYLES = ("adgen", "plain")


def _attributes(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    kind = rng.choice(sorted(KEYS_BY_TYPE))
    keys = KEYS_BY_TYPE[kind]
    naming = NAMING_KEY[kind]
    chosen = {naming, *rng.sample([k for k in keys if k != naming], rng.randint(2, 5))}
    # ADGEN lists 类型 first, then the other keys in a fixed order.
    return kind, [(k, rng.choice(VALUES[k])) for k in keys if k in chosen]


def _summary(rng: random.Random, kind: str, attrs: list[tuple[str, str]], style: str) -> str:
    naming = NAMING_KEY[kind]
    n_phrases = HOUSE_PHRASES if style == "adgen" else len(PHRASES[naming])
    name_value = dict(attrs)[naming]
    opening = PHRASES[naming][rng.randrange(n_phrases)].format(v=name_value)
    rest = [(k, v) for k, v in attrs if k != naming]
    if style == "plain":
        rng.shuffle(rest)  # other shops mention attributes in any order; ADGEN's house style follows the list
    clauses = [PHRASES[k][rng.randrange(n_phrases)].format(v=v) for k, v in rest]
    closer = rng.choice(CLOSERS if style == "adgen" else PLAIN_CLOSERS)
    return opening + "，" + "，".join(clauses) + closer


def _partition(content: str) -> str:
    """Every attribute list belongs to one style only, so pre-training text never contains a data set example."""
    return STYLES[hashlib.sha256(content.encode("utf-8")).digest()[0] & 1]


def generate(seed: int, n: int, style: str = "adgen") -> Iterator[dict[str, str]]:
    """`n` examples from `seed`; the same seed always gives the same examples in the same order.

    style "adgen": the data set (house phrasing, attributes in list order). style "plain": pre-training text
    (more phrasings, any order), over attribute lists that the "adgen" style never produces.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, not {style!r}")
    rng = random.Random(seed)
    made = 0
    while made < n:
        kind, attrs = _attributes(rng)
        content = "*".join(f"{k}#{v}" for k, v in [("类型", kind), *attrs])
        if _partition(content) != style:
            continue
        made += 1
        yield {"content": content, "summary": _summary(rng, kind, attrs, style)}


def plain_text(example: dict[str, str]) -> str:
    """The plain, non-chat form the embedded base is pre-trained on (never the prompt format P-tuning teaches)."""
    return f"{example['content']}\n{example['summary']}"
