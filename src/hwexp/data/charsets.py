"""Exact character class sets of the datasets hwexp trains and evaluates on.

Every set is a tuple of one-character strings.  The order is JIS X 0208 code order (which is
gojūon order for kana, small kana directly before their full-size counterpart) except for
``KMNIST_10`` and ``K49``, which follow the index order of their official classmap CSVs, so
that ``K49[i]`` is the character of label ``i``.  No data files are read: the lists are
built in (ETL data may never be committed) or generated from the ``euc_jp`` codec.

Sources (checked while writing this module):

* ETL1 (``ETL1C_07`` .. ``ETL1C_13``, M-type records): the per-file category table of the
  ETL1 documentation, reproduced in ``washboat/Japanese-Syllabary-Recognition``
  (``Util/data_definitions.py``): アイウエオカキク / ケコサシスセソタ / チツテトナニヌネ /
  ノハヒフヘホマミ / ムメモヤイユエヨ / ラリルレロワヰウ / ヱヲン, i.e. 51 categories laid out
  as the 5 x 10 + 1 kana table, where the ya- and wa-row cells of イ, ウ, エ repeat those
  characters, so there are 48 distinct katakana (the 46 basic ones plus ヰ and ヱ).
  The 2-byte ASCII "Character Code" field (bytes 3-4) is documented in the ETL format page
  ``form_m.htm`` with the examples ``"0 "``, ``"A "``, ``"$ "``, ``" A"``, ``"KA"``: Latin
  letters and digits are left-justified, single-letter *kana* readings are right-justified.
  Readers of the real files (a Node.js ETL1/ETL7 converter found by code search, and an
  ETL6 reader in a Vietnamese data-lake project) use ``" A" " I" " U" " E" " O"``, the
  Kunrei-shiki ``"SI" "TI" "TU" "HU"``, ``"WI" "WE" "WO"`` and ``" N"``; the repeated
  イ/エ (file 11) and ウ (file 12) carry the plain vowel codes ``" I"``, ``" E"``, ``" U"``.
  ``" N"`` for ン is confirmed there for ETL6/ETL7 (same M-type field) and inferred for
  ETL1.  Hepburn spellings (``"SH"``, ``"CH"``, ``"TS"``, ``"FU"``) are not documented for
  any ETL file and are not accepted.  JIS X 0201 has no half-width ヰ or ヱ, so only the
  reading field distinguishes them.
* ETL8 (ETL8G / ETL8B2, 956 classes) and ETL9 (ETL9G / ETL9B, 3036 classes): class lists
  extracted from the real files in ``ichisadashioko/etlcdb`` (``ETL8B/classes.tsv``, 956
  classes x 161 samples, and ``ETL9G/classes.tsv``, 3036 classes x 200 samples).  ETL8's 75
  hiragana are the 71 of ETL9 plus the small っ ゃ ゅ ょ; neither set has ぁ ぃ ぅ ぇ ぉ ゎ
  ゐ ゑ.  This agrees with ``washboat/Japanese-Syllabary-Recognition``
  (``hiragana/read_hiragana.py``), which drops nine small kana (not ぉ) from ETL8G's row 4 and
  gets exactly 71 classes, and with the ETL9B sample record 1 being あ (0x2422) followed by
  the kanji in JIS order.
* ETL8's 881 kanji: the same ``ETL8B/classes.tsv`` (there in Unicode order, as stored
  below).  They are the 1948 Tōyō kanji beppyō (the education kanji before the 1977
  revision) as encoded in the files, e.g. 燈 (JIS 0x4575) rather than 灯, and 壱, 弐, 后, 是,
  勧 are present; the 1977 additions such as 昔 皿 笛 箱 羊 豆 are absent.  Sanity checks
  run while writing: all 80 current grade-1 kanji are included and all 881 are JIS level 1.
* ETL9's 2965 kanji: JIS X 0208 level 1 (rows 16-47, 0x3021-0x4F53), generated here.
* Kuzushiji: ``kmnist_classmap.csv`` is お き す つ な は ま や れ を (``0,U+304A,お`` ...),
  and ``k49_classmap.csv`` lists あ..わ, ゐ, ゑ, を, ん and the iteration mark ゝ as index 48
  (Unicode order; two independent label lists found by code search agree, and the 697-byte
  size of the official CSV matches this layout).

Still unconfirmed: that ETL1 writes ン as ``" N"`` (rather than ``"N "``, which would clash
with the Latin N of ``ETL1C_03``); both the padded and the stripped forms are accepted.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CLASS_SETS",
    "ETL1_READINGS",
    "ETL8G_956",
    "ETL9G_3036",
    "HIRAGANA_ETL8",
    "HIRAGANA_ETL9",
    "K49",
    "KANJI_ETL8",
    "KANJI_JIS_LEVEL1",
    "KATAKANA_ETL1",
    "KMNIST_10",
    "char_to_jis0208",
    "jis0208_to_char",
    "resolve_class_set",
]

CHARS_PREFIX = "chars:"


def jis0208_to_char(code: int) -> str:
    """Return the character at JIS X 0208 code ``code`` (e.g. ``0x2422`` -> ``"あ"``).

    Raises ``ValueError`` if either byte is outside 0x21..0x7E or the cell is unassigned.
    """
    hi, lo = divmod(int(code), 0x100)
    if not (0x21 <= hi <= 0x7E and 0x21 <= lo <= 0x7E):
        raise ValueError(f"not a JIS X 0208 code: {code:#06x}")
    try:
        return bytes([hi | 0x80, lo | 0x80]).decode("euc_jp")
    except UnicodeDecodeError:
        raise ValueError(f"JIS X 0208 code {code:#06x} is unassigned") from None


def char_to_jis0208(ch: str) -> int:
    """Return the JIS X 0208 code of the single character ``ch`` (``"あ"`` -> ``0x2422``).

    Raises ``ValueError`` for strings that are not one character of JIS X 0208 (half-width
    katakana and JIS X 0212 characters included).
    """
    if not isinstance(ch, str) or len(ch) != 1:
        raise ValueError(f"expected one character, got {ch!r}")
    try:
        raw = ch.encode("euc_jp")
    except UnicodeEncodeError:
        raise ValueError(f"{ch!r} (U+{ord(ch):04X}) is not in JIS X 0208") from None
    if len(raw) != 2 or raw[0] < 0xA1:
        raise ValueError(f"{ch!r} (U+{ord(ch):04X}) is not in JIS X 0208")
    return ((raw[0] & 0x7F) << 8) | (raw[1] & 0x7F)


def _jis_sorted(chars: str | Sequence[str]) -> tuple[str, ...]:
    """The characters as a tuple in JIS X 0208 code order."""
    return tuple(sorted(chars, key=char_to_jis0208))


def _jis_range(first: int, last: int) -> tuple[str, ...]:
    """Every assigned character from JIS code ``first`` to ``last`` inclusive, in code order."""
    out: list[str] = []
    for hi in range(first >> 8, (last >> 8) + 1):
        for lo in range(0x21, 0x7F):
            code = (hi << 8) | lo
            if first <= code <= last:
                out.append(jis0208_to_char(code))
    return tuple(out)


# --- ETL1 katakana -----------------------------------------------------------------------

#: The 48 distinct katakana of ETL1C_07..13 in gojūon (= JIS) order: 46 basic plus ヰ, ヱ.
KATAKANA_ETL1: tuple[str, ...] = tuple(
    "アイウエオカキクケコサシスセソタチツテトナニヌネノ"
    "ハヒフヘホマミムメモヤユヨラリルレロワヰヱヲン"
)

# The reading of each KATAKANA_ETL1 entry, Kunrei-shiki as in the ETL1 files.
_ETL1_READING_ORDER: tuple[str, ...] = (
    *("A", "I", "U", "E", "O"),
    *("KA", "KI", "KU", "KE", "KO"),
    *("SA", "SI", "SU", "SE", "SO"),
    *("TA", "TI", "TU", "TE", "TO"),
    *("NA", "NI", "NU", "NE", "NO"),
    *("HA", "HI", "HU", "HE", "HO"),
    *("MA", "MI", "MU", "ME", "MO"),
    *("YA", "YU", "YO"),
    *("RA", "RI", "RU", "RE", "RO"),
    *("WA", "WI", "WE", "WO"),
    "N",
)


def _etl1_readings() -> dict[str, str]:
    readings: dict[str, str] = {}
    for reading, kana in zip(_ETL1_READING_ORDER, KATAKANA_ETL1, strict=True):
        readings[reading] = kana  # stripped form, e.g. "A", "KA"
        readings[reading.rjust(2)] = kana  # field as stored, e.g. " A", "KA"
    return readings


#: ETL1 M-type "Character Code" field (2 ASCII bytes, decoded) -> katakana.  Keys are the
#: field as stored (single letters right-justified: ``" A"``, ``" N"``) and its stripped
#: form (``"A"``, ``"N"``).  Left-justified ``"A "`` is the Latin letter A (ETL1C_02) and is
#: deliberately absent.
ETL1_READINGS: dict[str, str] = _etl1_readings()

# --- ETL8 / ETL9 hiragana ----------------------------------------------------------------

#: ETL9G / ETL9B hiragana (71): あ..ん without small kana, ゐ and ゑ, in JIS order.
HIRAGANA_ETL9: tuple[str, ...] = tuple(
    "あいうえおかがきぎくぐけげこごさざしじすずせぜそぞただちぢつづてでとどなにぬねの"
    "はばぱひびぴふぶぷへべぺほぼぽまみむめもやゆよらりるれろわをん"
)

#: ETL8G / ETL8B2 hiragana (75): the 71 of ETL9 plus small っ ゃ ゅ ょ, in JIS order.
HIRAGANA_ETL8: tuple[str, ...] = _jis_sorted((*HIRAGANA_ETL9, "っ", "ゃ", "ゅ", "ょ"))

# --- ETL8 kanji --------------------------------------------------------------------------

# The 881 kanji of ETL8 exactly as listed (in Unicode order) by ETL8B/classes.tsv of
# ichisadashioko/etlcdb; the public tuple below is re-sorted into JIS order.
_KANJI_ETL8_SOURCE = (
    "一丁七万三上下不世両中主久乗九予争事二五交京人仁今仏仕他付代令以仮件任休会伝似位"
    "低住体何余作使例供依価便係俗保信修俵倉個倍候借停健側備働像億元兄先光児党入全八公"
    "六共兵具典兼内円再写冬冷処出刀分切刊列初判別利制刷券則前創力功加助努労効勇勉動務"
    "勝勢勤勧包化北区医十千午半卒協南単博印厚原厳去参友反収取受口古句可台史右号司各合"
    "同名后向君否告周味命和品員唱商問善喜営器四回因団囲図固国園土圧在地坂均型基堂報場"
    "塩境墓増士声壱売変夏夕外多夜大天太夫央失奮女妹妻姉始委婦子字存孝季学孫守安完宗官"
    "定実客宣室宮害家容宿寄富寒察寺対専尊導小少就局居届屋展属山岩岸島川州工左差己市布"
    "希師席帯帰帳常幅平年幸幹広序底店府度庫庭康延建弁式弐引弟弱張強当形役往待律後徒従"
    "得復徳心必志応忠快念思急性恩息悪悲情想意愛感態慣憲成我戦戸所手才打承技投折招拝拡"
    "拾持指挙授採接推提損支改放政故救敗教散敬数整敵文料断新方旅族旗日旧早明易星春昨昭"
    "是昼時景晴暑暗暴曜曲書最月有服望朝期木未末本材村条来東板林果柱査栄校株根格案械森"
    "植検業極楽構様標権横橋機欠次欲歌歓止正武歩歯歴死残殺母毎毒比毛氏民気水氷永求池決"
    "汽河油治法波注泳洋活派流浅浴海消液深混清済減温測港湖湯満準漁演漢潔火災炭点無然焼"
    "照熱燃燈父版牛牧物特犬犯状独率玉王現球理生産用田由申男町画界畑留略番異疑病発登白"
    "百的皇皮益盟目直相省県真眼着知短石研破確示礼社祖祝神票祭禁福私秋科秒称移程税種穀"
    "積究空立章童競竹第筆等答策算管節築米粉精糸系紀約納純紙級素細終組経結給統絵絶絹続"
    "綿総緑線編練績織罪置美群義習老考者耕耳聖聞職肉肥育胃能脈腸臣臨自至興舌舎航船良色"
    "花芸芽苦英茶草荷菜落葉著蔵薬虫蚕血衆行術衛表補製複西要見規視覚親観角解言計討訓記"
    "設許訳証評詞試詩話認語誠誤説読課調談論諸講謝識議護谷豊象貝負財貧貨責貯貴買貸費貿"
    "賀賃資賛賞質赤走起足路身車軍転軽輪輸辞農辺近返述迷追退送逆通速造連週進遊運過道達"
    "遠適選遺郡部都配酒酸釈里重野量金鉄鉱銀銅銭録鏡長門開間関防限陛院除陸険陽隊階際集"
    "雑難雨雪雲電需青静非面革音順預領頭題額顔願類風飛食飯飲養館首馬駅験高魚鳥鳴麦黄黒"
    "鼻"
)

#: ETL8's 881 kanji (1948 Tōyō kanji beppyō as encoded in ETL8), in JIS order.
KANJI_ETL8: tuple[str, ...] = _jis_sorted(_KANJI_ETL8_SOURCE)

# --- JIS level 1 / ETL9 ------------------------------------------------------------------

#: JIS X 0208 level-1 kanji (2965): rows 16-47, 0x3021..0x4F53, in code order.
KANJI_JIS_LEVEL1: tuple[str, ...] = _jis_range(0x3021, 0x4F53)

#: ETL8's 956 classes (75 hiragana + 881 kanji), in JIS order.
ETL8G_956: tuple[str, ...] = _jis_sorted((*HIRAGANA_ETL8, *KANJI_ETL8))

#: ETL9's 3036 classes (71 hiragana + 2965 kanji), in JIS order (hiragana first, as in ETL9B).
ETL9G_3036: tuple[str, ...] = _jis_sorted((*HIRAGANA_ETL9, *KANJI_JIS_LEVEL1))

# --- Kuzushiji ---------------------------------------------------------------------------

#: Kuzushiji-MNIST classes in ``kmnist_classmap.csv`` index order.
KMNIST_10: tuple[str, ...] = tuple("おきすつなはまやれを")

#: Kuzushiji-49 classes in ``k49_classmap.csv`` index order (ゝ is index 48).
K49: tuple[str, ...] = tuple(
    "あいうえおかきくけこさしすせそたちつてとなにぬねの"
    "はひふへほまみむめもやゆよらりるれろわゐゑをんゝ"
)

# --- registry ----------------------------------------------------------------------------

#: Named class sets accepted by :func:`resolve_class_set`.
CLASS_SETS: dict[str, tuple[str, ...]] = {
    "katakana48": KATAKANA_ETL1,
    "hiragana75": HIRAGANA_ETL8,
    "hiragana71": HIRAGANA_ETL9,
    "kanji881": KANJI_ETL8,
    "etl8_956": ETL8G_956,
    "kanji2965": KANJI_JIS_LEVEL1,
    "etl9_3036": ETL9G_3036,
    "kmnist10": KMNIST_10,
    "k49": K49,
}


def _explicit(chars: Sequence[str], what: str) -> tuple[str, ...]:
    """Validate an explicit class list: non-empty, one character each, no duplicates."""
    out = tuple(chars)
    if not out:
        raise ValueError(f"{what} is empty")
    seen: set[str] = set()
    for ch in out:
        if not isinstance(ch, str) or len(ch) != 1:
            raise ValueError(f"{what}: every class must be a single character, got {ch!r}")
        if ch in seen:
            raise ValueError(f"{what}: duplicate character {ch!r} (U+{ord(ch):04X})")
        seen.add(ch)
    return out


def resolve_class_set(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Turn a class-set spec into the tuple of class characters, in class-index order.

    ``spec`` is a name from :data:`CLASS_SETS`, a string ``"chars:あいう"`` (each character
    after the prefix is one class), or a sequence of one-character strings.  Explicit lists
    keep their order.  Raises ``ValueError`` for an unknown name (listing the known names),
    an empty list, an element that is not one character, or a duplicate (naming it).
    """
    if isinstance(spec, str):
        if spec.startswith(CHARS_PREFIX):
            return _explicit(spec[len(CHARS_PREFIX) :], f"class set {spec!r}")
        try:
            return CLASS_SETS[spec]
        except KeyError:
            known = ", ".join(sorted(CLASS_SETS))
            raise ValueError(
                f"unknown class set {spec!r}; known names: {known} "
                f"(or {CHARS_PREFIX!r} followed by the characters, or a list of characters)"
            ) from None
    if isinstance(spec, Sequence):
        return _explicit(spec, "explicit class list")
    raise ValueError(f"class set spec must be a name or a list of characters, got {spec!r}")
