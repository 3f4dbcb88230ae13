"""Varied prompts for parity tests against the reference implementation."""

PASSAGE = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith "
    "from Mainz, combined several existing technologies into a system for producing books quickly and cheaply. "
    "Movable type had been invented centuries earlier in China and Korea, but the large number of characters in "
    "those writing systems made it less practical than it would become in Europe, where an alphabet of a few "
    "dozen letters could be cast in metal and rearranged endlessly. Gutenberg's contribution was not a single "
    "invention but an integration: a hand mould for casting uniform type, an oil-based ink that adhered to metal, "
    "and a screw press adapted from those used to make wine and olive oil. Within fifty years, presses had spread "
    "to more than two hundred cities, and millions of volumes had been printed. The consequences were enormous. "
    "Scholars could compare identical copies of a text, errors could be corrected in later editions, and ideas "
    "travelled faster than ever before. The Reformation, the Scientific Revolution and the rise of newspapers all "
    "depended on cheap printed material. Literacy rates rose slowly at first and then rapidly, as schools and "
    "libraries multiplied. Governments and churches tried to control what could be printed, issuing licences and "
    "lists of forbidden books, yet pamphlets and broadsides circulated widely regardless. By the eighteenth century "
    "the printed word had become the main medium of public debate, and the coffee houses of London, Paris and "
    "Amsterdam were filled with readers arguing over the latest journals. Today, when text moves instantly across "
    "networks, it is easy to forget how radical that first acceleration was. "
) * 2

PROMPTS = {
    "prose": "Write an email apologizing to Sarah for the tragic gardening mishap. Explain how it happened.",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n",
    "numbers": "The sum of 1234 and 5678 is 6912, and 3.14159 * 2 = 6.28318. In 2024, the population was",
    "non_english": "La capitale de la France est Paris. 日本の首都は東京です。 Die Hauptstadt von Deutschland ist",
    "passage": PASSAGE,
    "chat": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
}
