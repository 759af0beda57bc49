"""The official `openai` Python client against a real aios server, as a new user would use it.

Starts `target/debug/aios serve --port 0` (built by `cargo test`), reads the address it prints,
then runs chat (plain and streaming), completions and model listing through the client.
"""
import json
import sys

from aios_server import start, stop
from openai import OpenAI

passed = failed = 0


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


proc, base = start()
try:
    client = OpenAI(base_url=base + "/v1", api_key="not-needed")
    models = [m.id for m in client.models.list()]
    check("models.list names the default model", "smollm2" in models, models)

    r = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        temperature=0, max_tokens=24,
    )
    answer = r.choices[0].message.content
    check("chat answers Paris", "Paris" in answer, repr(answer))
    check("chat usage", r.usage.completion_tokens > 0, r.usage)

    stream = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    check("streamed chat equals the plain answer", "".join(parts) == answer, repr("".join(parts)))
    check("streamed usage", usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage)

    c = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=8, temperature=0)
    check("completions continue the count", c.choices[0].text.startswith(" 5, 6"), repr(c.choices[0].text))

    # Tool calls, as the client parses them.
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}}]
    question = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    r = client.chat.completions.create(model="smollm2", messages=question, tools=tools,
                                       tool_choice="required", temperature=0, max_tokens=80)
    call = r.choices[0].message.tool_calls[0] if r.choices[0].message.tool_calls else None
    check("tool call parsed by the client", call is not None and call.function.name == "get_weather"
          and r.choices[0].finish_reason == "tool_calls", r)
    args = json.loads(call.function.arguments) if call else {}
    check("tool call arguments follow the schema", isinstance(args.get("city"), str)
          and args.get("unit") in ("celsius", "fahrenheit"), args)

    stream = client.chat.completions.create(model="smollm2", messages=question, tools=tools,
                                            tool_choice="required", temperature=0, max_tokens=80,
                                            stream=True)
    name, arg_text, finish = "", "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        for d in chunk.choices[0].delta.tool_calls or []:
            name += d.function.name or ""
            arg_text += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    check("streamed tool call equals the plain one", call is not None and name == call.function.name
          and json.loads(arg_text) == args and finish == "tool_calls", (name, arg_text, finish))

    follow = question + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'},
    ] if call else question
    r = client.chat.completions.create(model="smollm2", messages=follow, temperature=0, max_tokens=40)
    check("a turn with the tool result answers", bool(r.choices[0].message.content), r)

    # Structured output: a JSON schema, and the client's own pydantic parsing.
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "Name the capital of France and its country as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}})
    place = json.loads(r.choices[0].message.content)
    check("json_schema output parses with the required keys", set(place) == {"city", "country"}, place)

    from pydantic import BaseModel

    class Place(BaseModel):
        city: str
        country: str

    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    r = parse(model="smollm2", temperature=0, max_tokens=60, response_format=Place,
              messages=[{"role": "user", "content": "Name the capital of France and its country as JSON."}])
    parsed = r.choices[0].message.parsed
    check("client.chat.completions.parse gives a pydantic object", isinstance(parsed, Place), r)

    # Embeddings.
    e = client.embeddings.create(model="all-minilm-l6-v2",
                                 input=["The weather is lovely today.", "It's so sunny outside!"])
    a, b = e.data[0].embedding, e.data[1].embedding
    sim = sum(x * y for x, y in zip(a, b))
    check("embeddings: 384 dims, sentence-transformers similarity", len(a) == 384
          and abs(sim - 0.6660) < 0.002, (len(a), sim))
    e64 = client.embeddings.create(model="all-minilm-l6-v2", input="The weather is lovely today.",
                                   encoding_format="base64")
    import base64, struct
    raw = e64.data[0].embedding
    floats = list(struct.unpack("<384f", base64.b64decode(raw))) if isinstance(raw, str) else raw
    check("embeddings: base64 decodes to the same vector",
          max(abs(x - y) for x, y in zip(floats, a)) < 1e-5, raw[:20])

    try:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        check("unknown model raises NotFoundError", False)
    except Exception as e:  # openai.NotFoundError
        check("unknown model raises NotFoundError", type(e).__name__ == "NotFoundError", repr(e))
finally:
    stop(proc)

print(f"openai-client: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
