"""The DSPy adapter: run DSPy programs for many sessions on stateless workers.

Load it with ``--handlers pyherd_worker.dspy_adapter`` (``pyherd --dspy``). The host keeps
every session's LM configuration and program definitions; each call carries what it
needs, so any worker can serve any session. The worker only caches what it built: LMs by
their configuration, modules by their definition (checked when first built). Calls run
with dspy's history off, so no session's prompts or answers stay in the worker.

Commands (the host adds ``list_programs``, ``get_program_info``, ``delete_program`` and
``cleanup_session``, which it answers from its session store):

- ``configure_lm`` ``{"provider": "dummy", "answers": {...}}`` (dspy's DummyLM in dict
  mode) or ``{"model", "api_key"?, "api_base"?, "temperature"?, "max_tokens"?,
  "num_retries"?, "cache"?}`` (``dspy.LM``): validated and built; answers
  ``{"provider", "model"}``, never the key. ``cache`` is off unless true: dspy's response
  cache is shared by every session and worker, keyed without the key or the API base.
- ``create_program`` ``{"id", "signature", "program_type"?, "instructions"?}``: the
  signature is ``"question, n: int -> answer"`` or ``{"inputs": [{"name",
  "description"?, "type"?}], "outputs": [...]}`` (types: ``FIELD_TYPES``, default
  ``str``; at most ``MAX_FIELDS`` fields); answers the canonical ``definition`` the host
  stores.
- ``execute_program`` ``{"program_id", "inputs", "program", "lm"}`` (``program`` and
  ``lm`` attached by the host): runs the module under ``dspy.context(lm=...)``, never a
  process-wide ``dspy.configure``, so sessions cannot leak into each other.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter, OrderedDict
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import

try:
    import dspy
    from dspy.utils import DummyLM
    from dspy.utils.exceptions import AdapterParseError
except ImportError as exc:
    raise ImportError(
        f"the DSPy adapter needs dspy in this interpreter ({exc}); "
        "install it with `pyherd setup` or `pip install dspy==3.4.1`"
    ) from exc

from .handlers import HandlerError, declare_adapter, handler

declare_adapter("dspy")

PROGRAM_TYPES = ("predict", "chain_of_thought")
#: Integers the worker's JSON encoder writes (orjson: 64 bits, signed or not).
INT_RANGE = range(-(2**63), 2**64)


def _is_int(value: Any) -> bool:
    return type(value) is int and value in INT_RANGE


def _is_float(value: Any) -> bool:
    return (type(value) is float and math.isfinite(value)) or _is_int(value)


def _list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: type(value) is list and all(check(v) for v in value)


def _is_bool(value: Any) -> bool:
    return type(value) is bool


def _is_str(value: Any) -> bool:
    return type(value) is str


#: The types a field may have (``name: type`` in a string signature) and what dspy is
#: given for each: values JSON carries both ways.
FIELD_TYPES: Dict[str, Any] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "list[str]": List[str],
    "list[int]": List[int],
    "list[float]": List[float],
    "list[bool]": List[bool],
}
#: The check of a value of each type but ``str``: a ``str`` input takes any JSON value, as
#: dspy formats it into the prompt, and a ``str`` output is what dspy parsed.
TYPE_CHECKS: Dict[str, Callable[[Any], bool]] = {
    "int": _is_int,
    "float": _is_float,
    "bool": _is_bool,
    "list[str]": _list_of(_is_str),
    "list[int]": _list_of(_is_int),
    "list[float]": _list_of(_is_float),
    "list[bool]": _list_of(_is_bool),
}
#: Keyword arguments dspy.Predict takes for itself: an input field so named would never
#: reach the prompt (``demos`` would even be taken as demonstrations, and a ``prediction``
#: object shaped like OpenAI's predicted outputs would be sent to the LM as that).
RESERVED_INPUTS = frozenset({"lm", "config", "demos", "signature", "new_signature", "self", "prediction"})
#: The most fields a signature has, inputs and outputs together: dspy builds a class with
#: a field each, and a prompt describing them all, on the call's worker.
MAX_FIELDS = 256
LM_KEYS = {"model", "api_key", "api_base", "temperature", "max_tokens", "num_retries", "cache"}
DUMMY_KEYS = {"provider", "answers"}
MAX_LMS = 64
MAX_MODULES = 256


class LMFailure(Exception):
    """Raised in place of any exception that escapes a call of the language model."""


try:
    import orjson

    def _canonical(value: Any, sort_keys: bool) -> bytes:
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
        except orjson.JSONEncodeError:  # an integer beyond 64 bits, from the stdlib codec
            return b"j" + json.dumps(value, sort_keys=sort_keys, separators=(",", ":")).encode()

except ImportError:  # pragma: no cover - dspy depends on orjson

    def _canonical(value: Any, sort_keys: bool) -> bytes:
        return json.dumps(value, sort_keys=sort_keys, separators=(",", ":")).encode()


class _Cache:
    """A small LRU map from a JSON value's canonical form to what was built from it
    (a call carries its program and LM settings every time: this keeps them built once).
    With ``sort_keys`` two objects that differ only in the order of their keys are one
    entry; without it they are two, for values whose order means something."""

    def __init__(self, size: int, sort_keys: bool) -> None:
        self.size = size
        self.sort_keys = sort_keys
        self.items: "OrderedDict[bytes, Any]" = OrderedDict()
        self.builds = 0

    def get(self, value: Any, build: Any) -> Any:
        key = _canonical(value, self.sort_keys)
        found = self.items.get(key)
        if found is not None:
            self.items.move_to_end(key)
            return found
        built = build(value)
        self.builds += 1
        self.items[key] = built
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return built


# The dummy LM tries its answers in their order (the first key found in the prompt
# answers), so LM settings whose keys come in another order are another LM.
_lms = _Cache(MAX_LMS, sort_keys=False)
_modules = _Cache(MAX_MODULES, sort_keys=True)


def _invalid(kind: str, message: str) -> HandlerError:
    return HandlerError("invalid_request", kind, message)


def _guard(lm: Any) -> Any:
    """Make every failure of `lm`'s calls an LMFailure, so it can be told from other errors
    (dspy's adapters retry and re-raise what the LM raised)."""
    cls = type(lm)

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return cls.__call__(self, *args, **kwargs)
        except LMFailure:
            raise
        except Exception as exc:
            raise LMFailure(f"{type(exc).__name__}: {exc}") from exc

    lm.__class__ = type(f"Guarded{cls.__name__}", (cls,), {"__call__": __call__})
    return lm


def _check_lm(config: Any) -> Tuple[str, str]:
    """Validate an LM configuration; returns (provider, model)."""
    if not isinstance(config, dict):
        raise _invalid("invalid_lm_config", f"the LM configuration must be an object, not {type(config).__name__}")
    if config.get("provider") == "dummy":
        unknown = sorted(set(config) - DUMMY_KEYS)
        if unknown:
            raise _invalid("invalid_lm_config", f"unknown keys for the dummy LM: {', '.join(unknown)}")
        answers = config.get("answers")
        if not isinstance(answers, dict) or not all(isinstance(v, dict) for v in answers.values()):
            raise _invalid(
                "invalid_lm_config",
                "the dummy LM needs \"answers\": {prompt substring: {output field: value}}",
            )
        return "dummy", "dummy"
    if "provider" in config:
        raise _invalid("invalid_lm_config", f"unknown provider {config['provider']!r} (\"dummy\", or give a \"model\")")
    unknown = sorted(set(config) - LM_KEYS)
    if unknown:
        raise _invalid("invalid_lm_config", f"unknown LM keys: {', '.join(unknown)} (known: {', '.join(sorted(LM_KEYS))})")
    model = config.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("invalid_lm_config", "the LM needs a \"model\" string, e.g. \"openai/gpt-4o-mini\"")
    for key, types, low in (
        ("api_key", str, None),
        ("api_base", str, None),
        ("temperature", (int, float), 0),
        ("max_tokens", int, 1),
        ("num_retries", int, 0),
        ("cache", bool, None),
    ):
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or (types is not bool and isinstance(value, bool)):
            raise _invalid("invalid_lm_config", f"{key!r} has the wrong type ({type(value).__name__})")
        if low is not None and not (math.isfinite(value) and value >= low):
            raise _invalid("invalid_lm_config", f"{key!r} must be a number of at least {low}, not {value!r}")
    return "litellm", model


def _build_lm(config: Dict[str, Any]) -> Any:
    _check_lm(config)
    if config.get("provider") == "dummy":
        return _guard(DummyLM(config["answers"]))
    kwargs = {k: v for k, v in config.items() if k != "model" and v is not None}
    kwargs.setdefault("num_retries", 0)  # the pool's retries, not the LM's, so they do not multiply
    # dspy's response cache is on disk, shared by every worker and kept across restarts, and
    # its key leaves out api_key and api_base: one session would get another's answers.
    kwargs.setdefault("cache", False)
    try:
        return _guard(dspy.LM(config["model"], **kwargs))
    except Exception as exc:
        raise _invalid("invalid_lm_config", f"dspy.LM refused the configuration: {exc}") from exc


def _split_fields(text: str) -> List[str]:
    """The fields of one side of a string signature: split at the commas outside brackets
    (``a, b: list[int]``), so a type with a comma is one field and refused by its name."""
    if not text.strip():
        return []
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _field_text(text: str) -> Dict[str, str]:
    """A field of a string signature: ``name`` or ``name: type``."""
    name, colon, type_name = text.partition(":")
    field = {"name": name.strip()}
    if colon:
        field["type"] = type_name.strip()
    return field


def _fields(spec: Any, side: str) -> List[Dict[str, Optional[str]]]:
    """The canonical fields of one side: ``{name, description}``, plus ``type`` when it
    is not ``str`` (so an untyped field and a ``str`` one are the same definition)."""
    if not isinstance(spec, list) or not spec:
        raise _invalid("invalid_signature", f"the signature needs at least one {side} field")
    fields = []
    for item in spec:
        if isinstance(item, str):
            item = _field_text(item)
        if not isinstance(item, dict) or set(item) - {"name", "description", "type"}:
            raise _invalid(
                "invalid_signature", f"a {side} field is {{\"name\", \"description\"?, \"type\"?}}, not {item!r}"
            )
        name, description, given = item.get("name"), item.get("description"), item.get("type")
        if not isinstance(name, str) or not name.isidentifier():
            raise _invalid("invalid_signature", f"{side} field name {name!r} is not a Python identifier")
        if description is not None and not isinstance(description, str):
            raise _invalid("invalid_signature", f"the description of {name!r} must be a string")
        type_name = "str" if given is None else "".join(given.split()) if isinstance(given, str) else None
        if type_name not in FIELD_TYPES:
            raise _invalid(
                "invalid_signature", f"the type of {name!r} is one of {', '.join(FIELD_TYPES)}, not {given!r}"
            )
        field: Dict[str, Optional[str]] = {"name": name, "description": description}
        if type_name != "str":
            field["type"] = type_name
        fields.append(field)
    return fields


def _parse_signature(signature: Any) -> Tuple[List[Dict[str, Optional[str]]], List[Dict[str, Optional[str]]]]:
    if isinstance(signature, str):
        if signature.count("->") != 1:
            raise _invalid("invalid_signature", f"a signature has exactly one '->', like 'question -> answer': {signature!r}")
        left, right = signature.split("->")
        given_inputs, given_outputs = _split_fields(left), _split_fields(right)
    elif isinstance(signature, dict):
        unknown = set(signature) - {"inputs", "outputs"}
        if unknown:
            raise _invalid("invalid_signature", f"unknown signature keys: {', '.join(sorted(unknown))}")
        given_inputs, given_outputs = signature.get("inputs"), signature.get("outputs")
    else:
        raise _invalid("invalid_signature", "the signature is a string ('question -> answer') or {inputs, outputs}")
    count = sum(len(side) for side in (given_inputs, given_outputs) if isinstance(side, list))
    if count > MAX_FIELDS:
        raise _invalid(
            "invalid_signature", f"a signature has at most {MAX_FIELDS} fields, inputs and outputs together, not {count}"
        )
    inputs, outputs = _fields(given_inputs, "input"), _fields(given_outputs, "output")
    times = Counter(f["name"] for f in inputs + outputs)
    duplicates = sorted(n for n, seen in times.items() if seen > 1)
    if duplicates:
        raise _invalid("invalid_signature", f"field names appear twice: {', '.join(duplicates)}")
    return inputs, outputs


def _check_names(inputs: List[Dict[str, Optional[str]]], program_type: str) -> None:
    """Refuse input names dspy would take for itself instead of passing them to the LM."""
    reserved = RESERVED_INPUTS | ({"reasoning"} if program_type == "chain_of_thought" else set())
    taken = sorted(f["name"] for f in inputs if f["name"] in reserved)  # type: ignore[misc]
    if taken:
        why = (
            "chain_of_thought adds its own \"reasoning\" output"
            if taken == ["reasoning"]
            else "dspy.Predict takes lm, config, demos, signature, new_signature and self as its own arguments, "
            "and prediction as OpenAI's predicted outputs"
        )
        raise _invalid("invalid_signature", f"input field name(s) {', '.join(taken)} cannot be used: {why}")


def _check_definition(definition: Any) -> Dict[str, Any]:
    """The canonical form of a definition (as create_program answers it); raises
    invalid_request errors for anything else."""
    if not isinstance(definition, dict) or not {"inputs", "outputs"} <= set(definition):
        raise _invalid("malformed_request", "a program definition is {inputs, outputs, program_type, instructions}")
    unknown = sorted(set(definition) - {"inputs", "outputs", "program_type", "instructions"})
    if unknown:
        raise _invalid("malformed_request", f"unknown program definition keys: {', '.join(unknown)}")
    program_type = definition.get("program_type", "predict")
    if program_type not in PROGRAM_TYPES:
        raise _invalid("invalid_program_type", f"program_type is one of {', '.join(PROGRAM_TYPES)}, not {program_type!r}")
    instructions = definition.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _invalid("malformed_request", "instructions must be a string")
    inputs, outputs = _parse_signature({"inputs": definition["inputs"], "outputs": definition["outputs"]})
    _check_names(inputs, program_type)
    return {"inputs": inputs, "outputs": outputs, "program_type": program_type, "instructions": instructions}


#: The fields of one side whose values are checked: (name, type, check), for every field
#: of a type other than ``str``.
Checks = Tuple[Tuple[str, str, Callable[[Any], bool]], ...]


class Built(NamedTuple):
    """A definition's module, its input names (in order, and as a set), the checks of its
    typed inputs and outputs, and the names of its ``str`` inputs."""

    module: Any
    inputs: Tuple[str, ...]
    input_set: frozenset
    input_checks: Checks
    output_checks: Checks
    text_inputs: frozenset


def _checks(fields: List[Dict[str, Any]]) -> Checks:
    return tuple((f["name"], f["type"], TYPE_CHECKS[f["type"]]) for f in fields if "type" in f)


def _prompt_value(value: Any) -> Any:
    """What dspy is given for the value of a ``str`` input: the value itself, but the JSON
    text of a list with an item that is not a string. dspy writes a list of strings as a
    numbered list of quoted items, and fails on any other item (or writes Python's repr of
    it); the JSON text is what it writes for a list, or an object, in a field of another
    type (``json.dumps`` with ``ensure_ascii=False``)."""
    if type(value) is list and not all(type(item) is str for item in value):
        return json.dumps(value, ensure_ascii=False)
    return value


def _build_program(definition: Any) -> Built:
    """Check a definition and build its module. Runs once per definition: the result is
    cached."""
    definition = _check_definition(definition)
    fields: Dict[str, Any] = {}
    for side, make in (("inputs", dspy.InputField), ("outputs", dspy.OutputField)):
        for f in definition[side]:
            field = make(desc=f["description"]) if f.get("description") else make()
            fields[f["name"]] = (FIELD_TYPES[f.get("type") or "str"], field)
    try:
        signature = dspy.Signature(fields, definition["instructions"])
    except Exception as exc:
        clashing = sorted(name for name in fields if hasattr(dspy.Signature, name))
        hint = f" (field names clashing with dspy.Signature's own attributes: {', '.join(clashing)})" if clashing else ""
        raise _invalid("invalid_signature", f"dspy refused the signature{hint}: {exc}") from exc
    module = dspy.ChainOfThought(signature) if definition["program_type"] == "chain_of_thought" else dspy.Predict(signature)
    names = tuple(str(f["name"]) for f in definition["inputs"])
    text = frozenset(str(f["name"]) for f in definition["inputs"] if "type" not in f)
    return Built(module, names, frozenset(names), _checks(definition["inputs"]), _checks(definition["outputs"]), text)


def _text(fields: List[Dict[str, Optional[str]]]) -> str:
    return ", ".join(f"{f['name']}: {f['type']}" if "type" in f else str(f["name"]) for f in fields)


@handler
def configure_lm(args: Any) -> Dict[str, str]:
    """Validate and build an LM; the host stores the configuration in the session."""
    provider, model = _check_lm(args)
    _lms.get(args, _build_lm)
    return {"provider": provider, "model": model}


@handler
def create_program(args: Any) -> Dict[str, Any]:
    """Validate a program definition by building it; answer its canonical form."""
    if not isinstance(args, dict):
        raise _invalid("malformed_request", "create_program takes {id, signature, program_type?, instructions?}")
    unknown = sorted(set(args) - {"id", "signature", "program_type", "instructions"})
    if unknown:
        raise _invalid("malformed_request", f"unknown create_program keys: {', '.join(unknown)}")
    program_id = args.get("id")
    if not isinstance(program_id, str) or not program_id:
        raise _invalid("malformed_request", "create_program needs an \"id\" string")
    inputs, outputs = _parse_signature(args.get("signature"))
    program_type = args.get("program_type")
    definition = _check_definition(
        {
            "inputs": inputs,
            "outputs": outputs,
            "program_type": "predict" if program_type is None else program_type,
            "instructions": args.get("instructions"),
        }
    )
    _modules.get(definition, _build_program)
    return {
        "program_id": program_id,
        "signature": f"{_text(inputs)} -> {_text(outputs)}",
        "program_type": definition["program_type"],
        "definition": definition,
    }


@handler
def execute_program(args: Any) -> Dict[str, Any]:
    """Run a stored program (definition and LM attached by the host) on some inputs."""
    if not isinstance(args, dict) or not isinstance(args.get("program"), dict):
        raise _invalid("malformed_request", "execute_program needs the program definition (call it through the pool)")
    module, expected, expected_set, input_checks, output_checks, text_inputs = _modules.get(
        args["program"], _build_program
    )
    inputs = args.get("inputs")
    if not isinstance(inputs, dict):
        raise _invalid("invalid_inputs", f"inputs must be an object of input fields, not {type(inputs).__name__}")
    if len(inputs) != len(expected) or not expected_set.issuperset(inputs):
        missing = [n for n in expected if n not in inputs]
        unknown = sorted(set(inputs) - expected_set)
        detail = "; ".join(
            part
            for part in (
                f"missing: {', '.join(missing)}" if missing else "",
                f"unknown: {', '.join(unknown)}" if unknown else "",
            )
            if part
        )
        raise _invalid("invalid_inputs", f"the program takes {', '.join(expected)} ({detail})")
    for name, type_name, check in input_checks:
        if not check(inputs[name]):
            raise _invalid("invalid_inputs", f"input {name!r} must be of type {type_name}, not {inputs[name]!r:.100}")
    config = args.get("lm")
    if config is None:
        raise _invalid("lm_not_configured", "this session has no LM: call configure_lm first")
    lm = _lms.get(config, _build_lm)
    inputs = {name: _prompt_value(value) if name in text_inputs else value for name, value in inputs.items()}
    started = time.perf_counter()
    try:
        # No history and a trace of this call only: dspy would otherwise keep the last
        # 10 000 prompts and answers of every session in this worker (and pay for it).
        with dspy.context(lm=lm, trace=[], disable_history=True):
            prediction = module(**inputs)
    except LMFailure as exc:
        raise HandlerError("python", "lm_error", f"the language model failed: {exc}") from exc
    except AdapterParseError as exc:
        raise HandlerError("python", "lm_error", f"the language model's answer cannot be parsed: {exc}") from exc
    # A plain dict: toDict's deep conversion costs ~10% of a call.
    outputs = dict(prediction.items())
    for name, type_name, check in output_checks:
        if not check(outputs.get(name)):
            # dspy reads "nan" as a float, and an int of any size: the worker's JSON
            # carries neither.
            message = f"the language model's answer for {name!r} is not a JSON value of type {type_name}"
            raise HandlerError("python", "lm_error", f"{message}: {outputs.get(name)!r:.100}")
    return {
        "program_id": args.get("program_id"),
        "outputs": outputs,
        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
    }
