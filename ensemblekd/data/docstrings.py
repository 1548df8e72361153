"""The built-in `docstrings` set (task text): real, labelled text that ships with Python.

Each row is the docstring of a public function, class, method or property of the standard library, labelled
with the chapter of the Python Library Reference its module belongs to (`CHAPTERS`; the module ->
chapter table is `MODULE_CHAPTERS`, after the Reference's table of contents, small chapters
merged). "Public" means a name without a leading underscore, defined in the module itself (its
own code, its C accelerator `_name`, or, for a package, its submodules) and, for methods, in the
class itself. Texts are cleaned with inspect.cleandoc, cut at a word boundary, and kept only when
at least MIN_CHARS long; an exact duplicate text is kept once. No module gives more than
`per_module` rows.

The splits are made by MODULE, not by row: no module is in two splits, so the test split measures
how well a model generalises to modules it has never seen (a row split would let it recognise a
class's methods from their siblings). Within each chapter the modules are shuffled with a seeded
RNG and dealt greedily so that each split gets about its fraction of the chapter's rows, and every
chapter has a module in every split.

The text comes from the running interpreter's standard library, so the rows (and counts) differ
slightly between Python versions; the set is deterministic for one Python.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import warnings
from collections import Counter

import numpy as np
import pyarrow as pa

from ensemblekd.data.inputs import LABEL_NAMES_KEY
from ensemblekd.errors import UserError
from ensemblekd.io import fs

CHAPTERS = (
    "text processing",                  # text and binary data services, internationalization, program frameworks
    "data types",
    "numeric and functional",           # numeric and mathematical modules, functional programming
    "file and directory access",
    "data storage",                     # persistence, compression and archiving, file formats, cryptographic
    "os services",                      # generic and Unix-specific operating system services
    "concurrency and networking",       # concurrent execution, networking and interprocess communication
    "internet data and markup",         # internet data handling, structured markup processing
    "internet protocols",
    "development and debugging",        # development tools, debugging and profiling, software packaging
    "runtime services",                 # Python runtime services, custom interpreters
    "importing and language services",  # importing modules, Python language services
)
MIN_CHARS = 40
SPLITS = ("train", "val", "test")
SPLIT_TRIES = 64  # seeded shuffles tried per chapter; the best-balanced one is kept

_CHAPTER_MODULES = {
    "text processing": "string re difflib textwrap unicodedata codecs struct gettext locale shlex cmd",
    "data types": "datetime zoneinfo calendar collections collections.abc heapq bisect array weakref types copy "
                  "pprint reprlib enum graphlib",
    "numeric and functional": "numbers math cmath decimal fractions random statistics itertools functools operator",
    "file and directory access": "pathlib os.path fileinput stat filecmp tempfile glob fnmatch linecache shutil",
    "data storage": "pickle copyreg shelve marshal dbm sqlite3 zlib gzip bz2 lzma zipfile tarfile csv configparser "
                    "netrc plistlib hashlib hmac secrets",
    "os services": "os io time argparse getopt optparse logging logging.config logging.handlers getpass platform "
                   "ctypes pty termios fcntl resource pwd grp",
    "concurrency and networking": "threading multiprocessing multiprocessing.pool multiprocessing.managers "
                                  "multiprocessing.connection multiprocessing.shared_memory concurrent.futures "
                                  "subprocess sched queue contextvars asyncio socket ssl select selectors signal",
    "internet data and markup": "email email.message email.utils email.header email.parser email.generator "
                                "email.policy email.headerregistry email.charset email.errors email.quoprimime "
                                "email.base64mime json mailbox mimetypes base64 binascii quopri html html.parser "
                                "xml.etree.ElementTree xml.dom xml.dom.minidom xml.dom.expatbuilder xml.sax "
                                "xml.sax.handler xml.sax.saxutils xml.sax.xmlreader",
    "internet protocols": "urllib.request urllib.parse urllib.robotparser http.client ftplib poplib imaplib smtplib "
                          "uuid socketserver http.server http.cookies http.cookiejar xmlrpc.client xmlrpc.server "
                          "ipaddress wsgiref.util wsgiref.headers wsgiref.handlers",
    "development and debugging": "typing doctest unittest unittest.mock bdb faulthandler pdb pstats timeit trace "
                                 "tracemalloc venv",
    "runtime services": "builtins sys sysconfig warnings dataclasses contextlib abc traceback gc inspect site code "
                        "codeop",
    "importing and language services": "zipimport pkgutil importlib importlib.util importlib.abc importlib.resources "
                                       "importlib.metadata ast symtable tokenize dis pickletools",
}
MODULE_CHAPTERS = {module: chapter for chapter, names in _CHAPTER_MODULES.items() for module in names.split()}

# where a module's objects may live besides the module itself (C accelerators named otherwise)
_EXTRA_HOMES = {"os": ("posix",), "os.path": ("genericpath",)}


def _defined_in(obj, name: str, module) -> bool:
    home = getattr(obj, "__module__", None)
    if not isinstance(home, str):
        return False
    if home in (name, module.__name__, "_" + name, *_EXTRA_HOMES.get(name, ())):
        return True
    return hasattr(module, "__path__") and home.startswith(name + ".")  # a package's own submodules


def _cut(text: str, max_chars: int) -> str:
    """text, or its longest prefix of at most max_chars that ends at a word boundary."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars + 1]
    if head[-1].isspace():
        return head.rstrip()
    words = head.rsplit(maxsplit=1)
    return words[0].rstrip() if len(words) == 2 else text[:max_chars]


def _docs(name: str) -> list[tuple[str, str]]:
    """(qualified name, cleaned docstring) of a module's public functions and classes, and of their classes'
    public methods and properties. Warnings (deprecated modules and names) are silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(name)
        except ImportError:  # an optional C extension this Python was built without (sqlite3, lzma, ...)
            return []
        return list(_walk(name, module))


def _walk(name: str, module):
    for key, obj in list(vars(module).items()):
        if key.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if not _defined_in(obj, name, module):
            continue
        members: list[tuple[str, object]] = [(key, obj)]
        if inspect.isclass(obj):
            for attr, member in list(vars(obj).items()):
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if not attr.startswith("_") and (inspect.isroutine(member) or inspect.isdatadescriptor(member)):
                    members.append((f"{key}.{attr}", member))
        for qualname, member in members:
            doc = getattr(member, "__doc__", None)
            if isinstance(doc, str):
                yield qualname, inspect.cleandoc(doc).strip()


def docstring_rows(max_chars: int = 600, per_module: int = 200) -> list[tuple[str, str, str, int]]:
    """(module, qualified name, text, class id) for the modules of MODULE_CHAPTERS, sorted by module
    and name. A text seen earlier in that order is dropped; a module with more than per_module rows
    keeps a fixed pseudo-random sample of its names (by hash, so the same names on every run)."""
    seen, rows = set(), []
    for module in sorted(MODULE_CHAPTERS):
        label = CHAPTERS.index(MODULE_CHAPTERS[module])
        kept = []
        for qualname, doc in sorted(_docs(module)):
            if len(doc) < MIN_CHARS:
                continue
            text = _cut(doc, max_chars)
            if text not in seen:
                seen.add(text)
                kept.append((module, qualname, text, label))
        if len(kept) > per_module:
            kept = sorted(sorted(kept, key=lambda r: hashlib.sha1(r[1].encode()).hexdigest())[:per_module])
        rows.extend(kept)
    return rows


def _deal(order: list[str], sizes: Counter, fractions: tuple[float, ...]) -> tuple[dict[str, int], float]:
    """Modules in `order`, each to the split furthest below its share of the rows; the last modules
    go to splits still empty. (assignment, total distance from the shares)."""
    total = sum(sizes[m] for m in order)
    got = [0] * len(fractions)
    assignment = {}
    for i, module in enumerate(order):
        empty = [s for s in range(len(fractions)) if got[s] == 0]
        choices = empty if len(order) - i <= len(empty) else range(len(fractions))
        split = max(choices, key=lambda s: fractions[s] * total - got[s])
        got[split] += sizes[module]
        assignment[module] = split
    return assignment, sum(abs(fractions[s] * total - got[s]) for s in range(len(fractions)))


def module_splits(rows, seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> dict[str, str]:
    """module -> split, dealt chapter by chapter (see the module docstring)."""
    sizes = Counter(module for module, *_ in rows)
    out = {}
    for c, chapter in enumerate(CHAPTERS):
        modules = sorted(m for m in sizes if MODULE_CHAPTERS[m] == chapter)
        if len(modules) < len(SPLITS):
            raise UserError(f"docstrings: chapter '{chapter}' has {len(modules)} modules with docstrings; "
                            f"it needs {len(SPLITS)}, one per split")
        rng = np.random.default_rng([seed, c])
        orders = [[modules[i] for i in rng.permutation(len(modules))] for _ in range(SPLIT_TRIES)]
        assignment, _ = min((_deal(order, sizes, fractions) for order in orders), key=lambda a: a[1])
        out.update({m: SPLITS[s] for m, s in assignment.items()})
    return out


def prepare_docstrings(out: str, shard_rows: int = 256, seed: int = 0,
                       fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> dict[str, str]:
    """Write the set as out/{train,val,test}/part-NNNNN.parquet: id int64 (unique across splits),
    text string, y int64 (a position in CHAPTERS), module string, rows in a seeded random order;
    the schema metadata names the classes (LABEL_NAMES_KEY)."""
    if shard_rows < 1:
        raise UserError("shard_rows must be at least 1")
    if len(fractions) != 3 or min(fractions) <= 0:
        raise UserError("docstrings: fractions must be three positive shares (train, val, test)")
    rows = docstring_rows()
    split_of = module_splits(rows, seed, fractions)
    metadata = {LABEL_NAMES_KEY: json.dumps(list(CHAPTERS)).encode()}
    paths = {}
    for split in SPLITS:
        ids = [i for i, row in enumerate(rows) if split_of[row[0]] == split]
        # in a seeded random order: rows are sorted by module, hence by chapter, and the trainer shuffles
        # only within a shard, so sorted shards would give batches of one or two classes
        ids = np.random.default_rng([seed, SPLITS.index(split)]).permutation(ids).tolist()
        split_dir = fs.join(out, split)
        for part, start in enumerate(range(0, len(ids), shard_rows)):
            chunk = ids[start:start + shard_rows]
            table = pa.table({
                "id": pa.array(chunk, pa.int64()),
                "text": pa.array([rows[i][2] for i in chunk], pa.string()),
                "y": pa.array([rows[i][3] for i in chunk], pa.int64()),
                "module": pa.array([rows[i][0] for i in chunk], pa.string()),
            }).replace_schema_metadata(metadata)
            fs.write_bytes_atomic(fs.join(split_dir, f"part-{part:05d}.parquet"), fs.table_to_parquet_bytes(table))
        paths[split] = split_dir
    return paths
