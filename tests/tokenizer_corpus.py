"""A shared corpus of tricky strings for tokenizer tests.

`CORPUS` mixes hand-picked cases (scripts, emoji, code, numbers, special tokens) with a
few systematic grids: whitespace of every kind followed by every kind of character,
contractions in both cases, digit runs of every length. Every entry is a valid `str`
(no lone surrogates), so it can be encoded as UTF-8.
"""

from itertools import product

_PLAIN = [
    "",
    "a",
    "Hello world",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "hello\nworld",
    "I am a small language model.",
    "What is the capital of France?",
    "Hi",
    " ",
    "x",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "abcdefghijklmnopqrstuvwxyz",
    "CamelCaseIdentifierWithManyParts",
    "snake_case_identifier_with_parts",
    "ALL CAPS SENTENCE, SHOUTING LOUDLY!",
]

_ACCENTED_LATIN = [
    "café",
    "naïve résumé",
    "Ångström",
    "Crème brûlée à la française",
    "Über Straße, Größe, Fußgänger",
    "São Paulo, Açores, Coração",
    "Łódź, Gdańsk, Kraków",
    "Dvořák Čeština žluťoučký kůň",
    "İstanbul ılık şehir",
    "e\u0301 (e + combining acute) vs é",
    "Ñandú y pingüino",
    "Þórr Ægir Øresund",
]

_EMOJI = [
    "🙂",
    "I love 🍕 and 🍣!",
    "👍🏻👍🏼👍🏽👍🏾👍🏿",
    "👨‍👩‍👧‍👦",
    "👩‍💻 coding",
    "🏳️‍🌈",
    "🇫🇷🇩🇪🇯🇵🇺🇸",
    "1️⃣ 2️⃣ #️⃣",
    "❤️ vs ❤",
    "🧑🏽‍🚀 astronaut",
    "🎵🎶🎵",
    "😀😃😄😁😆😅😂🤣",
    "é🎵漢字👨‍👩‍👧",
    "🏴󠁧󠁢󠁳󠁣󠁴󠁿 Scotland",
]

_SCRIPTS = [
    "漢字",
    "我爱自然语言处理。",
    "今天天气很好，我们去公园吧！",
    "日本語のテキストです。",
    "ひらがなとカタカナ",
    "カタカナ",
    "한국어 문장입니다.",
    "안녕하세요, 세계!",
    "مرحبا بالعالم",
    "اللغة العربية جميلة.",
    "שלום עולם",
    "עברית מימין לשמאל",
    "नमस्ते दुनिया",
    "हिन्दी भाषा",
    "สวัสดีชาวโลก",
    "ภาษาไทยไม่มีช่องว่าง",
    "Привет, мир!",
    "Съешь же ещё этих мягких французских булок.",
    "Γειά σου Κόσμε",
    "Ελληνικά: αβγδεζηθ ΑΒΓΔ",
    "Ողջույն աշխարհ",
    "გამარჯობა",
    "ሰላም ዓለም",
    "Xin chào thế giới",
]

_MIXED_SCRIPTS = [
    "Hello 世界 мир عالم",
    "English日本語English",
    "abcабвαβγ",
    "Python は楽しい！",
    "Tokyo (東京) and Seoul (서울)",
    "a漢b字c",
    "RTL mixed: hello שלום world",
    "emoji🙂inside🙂words",
]

_CODE = [
    "def f(x):\n    return x + 1\n",
    "for i in range(10):\n\tprint(i)",
    "if (a && b) { return c; }",
    "int main(void) {\n    printf(\"%d\\n\", 42);\n    return 0;\n}",
    "const x = () => { console.log('hi'); };",
    "fn main() { let v: Vec<u8> = vec![1, 2, 3]; }",
    'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println("hi")\n}',
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    '<div class="x"><a href="/p?q=1&r=2">link</a></div>',
    '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}',
    "#!/bin/bash\nfor f in *.txt; do echo \"$f\"; done",
    "x+=1;y-=2;z*=3;w/=4;",
    "a->b; c::d; e=>f; g<=h; i!=j; k===l",
    "    indented with four spaces",
    "\t\ttwo tabs",
    "lambda: None  # comment",
    "@decorator\nclass Foo(Bar):\n    pass",
    "arr[0][1] = {'k': v}",
    "// TODO(bob): fix this\n/* block */",
    "x = 0x1F; y = 0b1010; z = 1e-9",
]

_NUMBERS = [
    "0",
    "42",
    "1234567890123456789012345",
    "3.14159265358979",
    "-273.15",
    "+1 (555) 123-4567",
    "2024-01-15",
    "15/01/2024 13:45:07",
    "$1,234,567.89",
    "€99,95",
    "1e10 2.5E-3",
    "99%",
    "v1.2.3-beta.4",
    "Room 101, floor 7",
    "123 456 789",
    "x²+y²=z²",
    "½ cup, ¾ teaspoon",
    "١٢٣ ٤٥٦",
    "१२३ ४५६",
    "①②③",
    "１２３ fullwidth",
    "Ⅻ roman numeral",
    "3rd 2nd 1st 21st",
    "a1b2c3",
    "00000000000000000000000000000000000000000000000001",
]

_WHITESPACE = [
    "   leading spaces",
    "trailing spaces   ",
    "  both  ",
    "multiple     spaces     between",
    "tab\tseparated\tvalues",
    "line1\nline2\nline3",
    "windows\r\nline\r\nendings\r\n",
    "\n\n\nleading newlines",
    "trailing newlines\n\n\n",
    "\t",
    "\n",
    "\r\n",
    "    ",
    " \t \n \r\n ",
    "a \n b",
    "non\xa0breaking\xa0space",
    "ideographic\u3000space",
    "line\u2028separator",
    "form\x0cfeed and vertical\x0btab",
    "information\x1cseparators\x1fhere",
    "nul\x00byte",
    "zero\u200bwidth\u200bspace",
    "bom\ufeffinside",
]

_CONTRACTIONS = [
    "don't won't can't shouldn't",
    "I'm you're we've they'd she'll it's",
    "I'M YOU'RE WE'VE THEY'D SHE'LL IT'S",
    "Don'T mIxEd'Ll",
    "rock 'n' roll",
    "'s at the start",
    "the dog's bone's owner's",
    "curly ’s and ’t quotes",
    "''quoted''",
    "'",
]

_PUNCTUATION = [
    "!!!",
    "???!!!...",
    "Wait... what?!",
    "--- === +++ ***",
    "(((nested)))",
    "[brackets] {braces} <angles>",
    "«guillemets» „quotes“ “curly”",
    "em—dash en–dash",
    "semicolon; colon: comma,",
    "@#$%^&*()_+-=[]{}|;':\",./<>?`~",
    "…",
    "¿Qué? ¡Sí!",
    "、。「」『』",
]

_WEB = [
    "https://www.example.com/path/to/page?query=1&lang=en#section",
    "http://localhost:8080/api/v1/users/42",
    "Visit https://huggingface.co/HuggingFaceTB today",
    "mailto:someone@example.org",
    "john.doe+tag@mail.example.co.uk",
    "ftp://files.example.net/pub/file.tar.gz",
    "@user #hashtag $TICKER",
    "C:\\Users\\Name\\Documents\\file.txt",
]

_SPECIAL_TOKENS = [
    "a<|im_start|>b",
    "<|im_end|>\n",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|endoftext|>more text",
    "<|im_start|><|im_end|>",
    "<|im_start|<|im_end|>",
    "< |im_start| >",
    "<|im_start|>system\nYou are helpful.<|im_end|>",
    " <|im_end|> ",
    "<|IM_START|> is not special",
    "<repo_name>x<file_sep>y<filename>z",
]

_LONG = [
    "a" * 500,
    "ab" * 300,
    "Supercalifragilisticexpialidocious" * 5,
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "abc def " * 100,
    "🙂" * 50,
    "漢" * 200,
    " " * 100,
    "\n" * 50,
    "9" * 200,
    "x" + "-" * 300 + "x",
    "The quick brown fox jumps over the lazy dog. " * 20,
]


def _whitespace_grid() -> list[str]:
    """Every kind of whitespace run, followed by every kind of character."""
    gaps = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n "]
    followers = ["1", "x", "!", "é", "🙂", "漢", "'s", "²"]
    return [f"a{gap}{follower}" for gap, follower in product(gaps, followers)]


def _contraction_grid() -> list[str]:
    """Each English contraction in lower and upper case, after a word and on its own."""
    suffixes = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
    strings = []
    for suffix in suffixes:
        for variant in (suffix, suffix.upper()):
            strings += [f"it{variant} ok", f"x {variant}"]
    return strings


def _digit_runs() -> list[str]:
    """Digit runs of each length 1..16, bare, after a space, and inside a word."""
    strings = []
    for length in range(1, 17):
        digits = "1234567890123456"[:length]
        strings += [digits, f"n {digits}", f"id{digits}x"]
    return strings


def _emoji_grid() -> list[str]:
    """Emoji with each skin tone, and a few country flags, after a space."""
    tones = ["\U0001f3fb", "\U0001f3fc", "\U0001f3fd", "\U0001f3fe", "\U0001f3ff"]
    bases = ["👋", "👩‍🔬"]
    flags = ["🇬🇧", "🇧🇷", "🇮🇳", "🇰🇷"]
    with_tones = [f"hi {base[0]}{tone}{base[1:]}" for base, tone in product(bases, tones)]
    return with_tones + [f"flag {flag}" for flag in flags]


CORPUS: list[str] = [
    *_PLAIN,
    *_ACCENTED_LATIN,
    *_EMOJI,
    *_SCRIPTS,
    *_MIXED_SCRIPTS,
    *_CODE,
    *_NUMBERS,
    *_WHITESPACE,
    *_CONTRACTIONS,
    *_PUNCTUATION,
    *_WEB,
    *_SPECIAL_TOKENS,
    *_LONG,
    *_whitespace_grid(),
    *_contraction_grid(),
    *_digit_runs(),
    *_emoji_grid(),
]
