"""JSON as a pushdown automaton over bytes: it accepts exactly the prefixes of valid JSON (optionally of one schema).

    from ch07.json_automaton import JSONAutomaton
    fsm = JSONAutomaton.for_json_object()                     # or JSONAutomaton.for_schema({"type": "object", ...})
    s = fsm.walk(fsm.initial, b'{"a": [1, 2')                 # None as soon as the bytes stop being a valid prefix
    fsm.accepts(fsm.walk(fsm.initial, b'{"a": 1}'))           # True: a complete value (no trailing bytes allowed)

A state is a hashable ``(stack, whitespace_run)``: the stack holds one small tuple per open construct (an object, an
array, a string, a number, a literal being spelled), so constrained decoding (constrained.py) can cache token masks by
state. Strings are checked byte by byte as UTF-8 (a multi-byte character may span two tokens), with escapes and
``\\uXXXX``; numbers follow RFC 8259's grammar. Runs of whitespace are capped (``max_ws``) and numbers have at most
``max_number_chars`` characters, so a model cannot loop forever on them. A schema is compiled into a table of nodes; keys
come in the schema's order (optional ones may be skipped, required ones must appear), as vLLM's and outlines'
structured outputs do. Reference: RFC 8259 (JSON); JSON Schema 2020-12 (the subset ``SchemaCompiler`` documents).
"""

from __future__ import annotations

import json

WS = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
DEAD, OK, SPACE, RETRY = 0, 1, 2, 3  # what a frame did with a byte; RETRY = it closed, give the byte to its parent
ANY, ANY_OBJECT = 0, 1  # the two nodes every table starts with
ANNOTATIONS = {"title", "description", "$schema", "$id", "$comment", "default", "examples"}
ALLOWED_KEYS = {
    "object": {"type", "properties", "required", "additionalProperties"},
    "array": {"type", "items", "minItems", "maxItems"},
    "string": {"type", "minLength", "maxLength"},
    "integer": {"type"},
    "number": {"type"},
    "boolean": {"type"},
    "null": {"type"},
}
# UTF-8 lead byte -> (continuation bytes, allowed range of the first one) (RFC 3629: no overlongs, no surrogates)
UTF8_LEAD = {b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)}
UTF8_LEAD.update({b: (2, 0x80, 0xBF) for b in range(0xE1, 0xF0)} | {0xE0: (2, 0xA0, 0xBF), 0xED: (2, 0x80, 0x9F)})
UTF8_LEAD.update({0xF0: (3, 0x90, 0xBF), 0xF1: (3, 0x80, 0xBF), 0xF2: (3, 0x80, 0xBF), 0xF3: (3, 0x80, 0xBF)})
UTF8_LEAD[0xF4] = (3, 0x80, 0x8F)
NUMBER_NEXT = {  # number phase -> {byte class: next phase}; complete phases are those a number may end in
    "zero": {".": "dot", "e": "e"},
    "int": {"digit": "int", ".": "dot", "e": "e"},
    "dot": {"digit": "frac"},
    "frac": {"digit": "frac", "e": "e"},
    "e": {"+": "esign", "-": "esign", "digit": "exp"},
    "esign": {"digit": "exp"},
    "exp": {"digit": "exp"},
}
NUMBER_DONE = {"zero", "int", "frac", "exp"}


def _literal(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class SchemaCompiler:
    """JSON Schema (a practical subset) -> node table. Nodes: ("any",), ("anyobj",), ("obj", props, cands, closable),
    ("arr", item, min, max), ("str", min, max), ("num", integer_only), ("lits", literal_bytes).

    Supported: type object (properties, required, additionalProperties — with properties, only those keys are
    generated either way; without, any keys unless it is false), array (items, minItems, maxItems), string (minLength,
    maxLength), integer, number, boolean, null; enum / const anywhere; annotations (title, description, ...) ignored.
    Anything else (pattern, format, minimum, anyOf, $ref, type lists, ...) raises ValueError (the server answers 400)."""

    def __init__(self):
        self.nodes: list[tuple] = [("any",), ("anyobj",)]

    def add(self, node: tuple) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def compile(self, schema, path: str = "$") -> int:
        if not isinstance(schema, dict):
            raise ValueError(f"schema at {path} must be an object, got {type(schema).__name__}")
        keys = set(schema) - ANNOTATIONS
        if "enum" in keys or "const" in keys:
            return self._literals(schema, keys, path)
        kind = schema.get("type", "object" if "properties" in schema else None)
        if kind is None:
            if keys:
                raise ValueError(f"schema at {path} uses {sorted(keys)} without a 'type'; unsupported")
            return ANY
        if not isinstance(kind, str) or kind not in ALLOWED_KEYS:
            raise ValueError(f"schema at {path}: type {kind!r} is not supported (use one of {sorted(ALLOWED_KEYS)})")
        extra = keys - ALLOWED_KEYS[kind]
        if extra:
            raise ValueError(f"schema at {path}: keyword(s) {sorted(extra)} not supported for type {kind!r}")
        if kind == "object":
            return self._object(schema, path)
        if kind == "array":
            lo, hi = _bounds(schema, "minItems", "maxItems", path)
            item = self.compile(schema.get("items", {}), path + "[]")
            return self.add(("arr", item, lo, hi))
        if kind == "string":
            return self.add(("str", *_bounds(schema, "minLength", "maxLength", path)))
        if kind in ("integer", "number"):
            return self.add(("num", kind == "integer"))
        return self.add(("lits", (b"true", b"false") if kind == "boolean" else (b"null",)))

    def _literals(self, schema, keys, path) -> int:
        if keys - {"enum", "const", "type"}:
            raise ValueError(f"schema at {path}: {sorted(keys - {'enum', 'const', 'type'})} beside enum/const")
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        if not isinstance(values, list) or not values:
            raise ValueError(f"schema at {path}: enum must be a non-empty list")
        return self.add(("lits", tuple(dict.fromkeys(_literal(v) for v in values))))

    def _object(self, schema, path) -> int:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties", True)
        if not isinstance(props, dict) or not isinstance(required, list) or not isinstance(extra, bool):
            raise ValueError(f"schema at {path}: properties must be an object, required a list, "
                             "additionalProperties true or false (schemas there are unsupported)")  # fmt: skip
        missing = [r for r in required if r not in props]
        if missing:
            raise ValueError(f"schema at {path}: required {missing} not in properties")
        if not props:
            return ANY_OBJECT if extra else self.add(("lits", (b"{}",)))
        names = list(props)
        children = [self.compile(props[n], f"{path}.{n}") for n in names]
        req = [n in required for n in names]
        cands, closable = [], []
        for i in range(len(names) + 1):  # keys allowed after the i-th: up to and including the next required one
            j = next((k for k in range(i, len(names)) if req[k]), len(names) - 1)
            cands.append(tuple((_literal(names[k]), k + 1, children[k]) for k in range(i, j + 1)))
            closable.append(not any(req[i:]))
        return self.add(("obj", tuple(cands), tuple(closable)))


def _bounds(schema: dict, lo_key: str, hi_key: str, path: str) -> tuple[int, int | None]:
    """(minimum, maximum or None) of a length bound pair, checked."""
    lo, hi = schema.get(lo_key, 0), schema.get(hi_key)
    for key, v in ((lo_key, lo), (hi_key, hi)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ValueError(f"schema at {path}: {key} must be a non-negative integer, got {v!r}")
    if hi is not None and lo > hi:
        raise ValueError(f"schema at {path}: {lo_key} {lo} > {hi_key} {hi}: no value fits")
    return lo, hi


class JSONAutomaton:
    """Byte-level pushdown automaton for JSON values of one compiled schema (node ANY = any JSON value)."""

    def __init__(self, nodes: list[tuple], root: int, max_ws: int = 8, max_number_chars: int = 20, max_depth: int = 32):
        self.nodes, self.root = [*nodes, ("lits", (b"true", b"false", b"null"))], root
        self.tfn = len(self.nodes) - 1  # the literals a value of any type may spell
        self.max_ws, self.max_number_chars, self.max_depth = max_ws, max_number_chars, max_depth
        self.initial = ((("V", root),), 0)
        self.handlers = {"V": self._value, "O": self._obj, "G": self._anyobj, "A": self._arr, "S": self._str,
                         "N": self._num, "L": self._lits}  # fmt: skip

    @classmethod
    def for_json_object(cls, **kw) -> JSONAutomaton:
        return cls([("any",), ("anyobj",)], ANY_OBJECT, **kw)

    @classmethod
    def for_schema(cls, schema: dict, **kw) -> JSONAutomaton:
        c = SchemaCompiler()
        root = c.compile(schema)
        return cls(c.nodes, root, **kw)

    # ------------------------------------------------------------------------------------------------ public
    def step(self, state, b: int):
        """The state after byte ``b``, or None when ``b`` cannot continue a valid prefix."""
        stack, ws = list(state[0]), state[1]
        while stack:
            r = self.handlers[stack[-1][0]](stack, b)
            if r != RETRY:
                break
            stack.pop()
        else:
            return None  # a byte after a complete top-level value
        if r == DEAD or (r == SPACE and ws >= self.max_ws):
            return None
        return tuple(stack), ws + 1 if r == SPACE else 0

    def walk(self, state, data: bytes):
        for b in data:
            state = self.step(state, b)
            if state is None:
                return None
        return state

    def accepts(self, state) -> bool:
        """Is the text so far a complete value? (A trailing number or literal closes at the end of the text.)"""
        stack = state[0]
        if len(stack) == 1 and stack[0][0] in "NL":
            return self._closable(stack[0])
        return not stack

    def finished(self, state) -> bool:
        """Complete, and no byte can follow (only the end of the text)."""
        return not state[0]

    # ------------------------------------------------------------------------------------------------ frames
    def _closable(self, frame) -> bool:
        if frame[0] == "N":
            return frame[2] in NUMBER_DONE
        return frame[2] in self.nodes[frame[1]][1]

    def _value(self, stack, b) -> int:
        """("V", node): a value starts here."""
        if b in WS:
            return SPACE
        node = self.nodes[stack[-1][1]]
        kind = node[0]
        if kind == "lits":
            stack[-1] = ("L", stack[-1][1], b"")
            return self._lits(stack, b)
        if kind == "any":
            kind = {
                ord("{"): "anyobj",
                ord("["): "arr",
                ord('"'): "str",
                ord("t"): "t",
                ord("f"): "t",
                ord("n"): "t",
            }.get(b, "num")
            if kind == "t":
                stack[-1] = ("L", self.tfn, b"")
                return self._lits(stack, b)
            node = {"arr": ("arr", ANY, 0, None), "str": ("str", 0, None), "num": ("num", False)}.get(kind, node)
        if kind in ("anyobj", "obj", "arr") and sum(f[0] in "OGA" for f in stack) >= self.max_depth:
            return DEAD
        opener = {"anyobj": ord("{"), "obj": ord("{"), "arr": ord("["), "str": ord('"')}.get(kind)
        if opener is not None:
            if b != opener:
                return DEAD
            if kind == "anyobj":
                stack[-1] = ("G", "open")
            elif kind == "obj":
                stack[-1] = ("O", stack[-1][1], 0, "open", b"")
            else:
                stack[-1] = ("A", node, 0, "open") if kind == "arr" else ("S", node[1], node[2], 0, 0)
            return OK
        stack[-1] = ("N", node[1], "start", 0)
        return self._num(stack, b)

    def _obj(self, stack, b) -> int:
        """("O", node, i, phase, key_prefix): an object of a schema; i = how many of its properties are behind us."""
        _, nid, i, phase, prefix = stack[-1]
        _, cands, closable = self.nodes[nid]
        if phase == "key":
            prefix += bytes([b])
            hit = [c for c in cands[i] if c[0].startswith(prefix)]
            if not hit:
                return DEAD
            done = next((c for c in hit if c[0] == prefix), None)  # keys end with '"': never a prefix of another
            stack[-1] = ("O", nid, done[1], "colon", done[2]) if done else ("O", nid, i, "key", prefix)
            return OK
        if b in WS:
            return SPACE
        if phase == "colon":
            if b != ord(":"):
                return DEAD
            stack[-1] = ("O", nid, i, "after", b"")
            stack.append(("V", prefix))  # in the colon phase the last field holds the value's node
            return OK
        if b == ord("}") and phase in ("open", "after") and closable[i]:
            stack.pop()
            return OK
        if b == ord(",") and phase == "after" and cands[i]:
            stack[-1] = ("O", nid, i, "next", b"")
            return OK
        if b == ord('"') and phase in ("open", "next") and cands[i]:
            stack[-1] = ("O", nid, i, "key", b'"')
            return OK
        return DEAD

    def _anyobj(self, stack, b) -> int:
        """("G", phase): an object with any keys and values."""
        phase = stack[-1][1]
        if b in WS:
            return SPACE
        if b == ord("}") and phase in ("open", "after"):
            stack.pop()
        elif b == ord('"') and phase in ("open", "next"):
            stack[-1] = ("G", "colon")
            stack.append(("S", 0, None, 0, 0))
        elif b == ord(":") and phase == "colon":
            stack[-1] = ("G", "after")
            stack.append(("V", ANY))
        elif b == ord(",") and phase == "after":
            stack[-1] = ("G", "next")
        else:
            return DEAD
        return OK

    def _arr(self, stack, b) -> int:
        """("A", node, count, phase): an array; node = ("arr", item, min_items, max_items)."""
        _, node, count, phase = stack[-1]
        _, item, lo, hi = node
        if b in WS:
            return SPACE
        if phase == "after":
            if b == ord(",") and (hi is None or count < hi):
                stack[-1] = ("A", node, count, "elem")
            elif b == ord("]") and count >= lo:
                stack.pop()
            else:
                return DEAD
            return OK
        if b == ord("]") and phase == "open" and lo == 0:
            stack.pop()
            return OK
        if hi is not None and count >= hi:
            return DEAD
        stack[-1] = ("A", node, count + 1, "after")
        stack.append(("V", item))
        return self._value(stack, b)

    def _str(self, stack, b) -> int:
        """("S", min_len, max_len, length, sub): inside a string; sub = 0, "esc", ("x", hex left), ("c", left, lo, hi).
        ``length`` counts characters only as far as a bound needs it (so unbounded strings share one state)."""
        _, lo, hi, n, sub = stack[-1]
        if sub == 0:
            if b == ord('"'):
                if n < lo:
                    return DEAD
                stack.pop()
                return OK
            if b < 0x20 or (hi is not None and n >= hi):
                return DEAD
            n = n + 1 if hi is not None else min(n + 1, lo)
            if b == ord("\\"):
                sub = "esc"
            elif b >= 0x80:
                if b not in UTF8_LEAD:
                    return DEAD
                sub = ("c", *UTF8_LEAD[b])
        elif sub == "esc":
            if b not in ESCAPES and b != ord("u"):
                return DEAD
            sub = ("x", 4) if b == ord("u") else 0
        elif sub[0] == "x":
            if b not in HEX:
                return DEAD
            sub = ("x", sub[1] - 1) if sub[1] > 1 else 0
        else:
            if not sub[2] <= b <= sub[3]:
                return DEAD
            sub = ("c", sub[1] - 1, 0x80, 0xBF) if sub[1] > 1 else 0
        stack[-1] = ("S", lo, hi, n, sub)
        return OK

    def _num(self, stack, b) -> int:
        """("N", integer_only, phase, chars): a number; it closes (RETRY) at the first byte that cannot extend it."""
        _, integer, phase, n = stack[-1]
        c = "digit" if b in DIGITS else chr(b).lower() if b < 0x80 else ""
        if phase == "start":
            nxt = "sign" if c == "-" else "zero" if b == ord("0") else "int" if c == "digit" else None
        elif phase == "sign":
            nxt = "zero" if b == ord("0") else "int" if c == "digit" else None
        else:
            nxt = NUMBER_NEXT[phase].get(c)
        if nxt in ("dot", "e", "esign") and integer:
            nxt = None
        if nxt is not None and n + 1 + (nxt not in NUMBER_DONE) <= self.max_number_chars:  # room to complete it
            stack[-1] = ("N", integer, nxt, n + 1)
            return OK
        return RETRY if phase in NUMBER_DONE else DEAD

    def _lits(self, stack, b) -> int:
        """("L", node, prefix): spelling one of a node's literals (enum/const values, true/false/null)."""
        _, nid, prefix = stack[-1]
        lits = self.nodes[nid][1]
        longer = prefix + bytes([b])
        if any(x.startswith(longer) for x in lits):
            stack[-1] = ("L", nid, longer)
            return OK
        return RETRY if prefix in lits else DEAD


def validate(value, schema: dict, path: str = "$") -> list[str]:
    """Errors of ``value`` against a schema of the subset above ([] = valid): the check the tests run on outputs."""
    if "enum" in schema or "const" in schema:
        ok = value in (schema["enum"] if "enum" in schema else [schema["const"]])
        return [] if ok else [f"{path}: {value!r} not in enum/const"]
    kind = schema.get("type", "object" if "properties" in schema else None)
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None), "number": (int, float)}
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is not None:
        ok = isinstance(value, types[kind]) and not (kind == "number" and isinstance(value, bool))
    else:
        return []
    if not ok:
        return [f"{path}: expected {kind}, got {type(value).__name__}"]
    errors = []
    if kind == "object":
        props = schema.get("properties", {})
        errors += [f"{path}: missing required {k!r}" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties", True) is False:
            errors += [f"{path}: unexpected key {k!r}" for k in value if k not in props]
        for k, v in value.items():
            errors += validate(v, props[k], f"{path}.{k}") if k in props else []
    elif kind == "array":
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            errors.append(f"{path}: {len(value)} items outside [minItems, maxItems]")
        for i, v in enumerate(value):
            errors += validate(v, schema.get("items", {}), f"{path}[{i}]")
    elif kind == "string" and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        errors.append(f"{path}: length {len(value)} outside [minLength, maxLength]")
    return errors
