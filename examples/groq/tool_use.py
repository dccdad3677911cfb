# A tool-use round trip written for the groq SDK the way Groq's tool-use docs write one: define
# a tool, let the model call it, run it, send the result back, print the final answer. Not one
# of the reference's examples (the reference has no tool use); it runs unchanged on Groq.
# tool_choice="required" and parallel_tool_calls=False: the bundled 135M model answers "auto"
# in text and repeats parallel calls (docs/api.md, Tools).
import json

from groq import Groq

client = Groq()
MODEL = "mixtral-8x7b-32768"


def get_current_weather(location, unit="celsius"):
    """Get the current weather in a given location (a stand-in for a real weather service)."""
    return json.dumps({"location": location, "temperature": "22", "unit": unit})


def run_conversation(user_prompt):
    messages = [{"role": "user", "content": user_prompt}]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_current_weather",
                "description": "Get the current weather in a given location",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "location": {"type": "string", "description": "The city, e.g. San Francisco"},
                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    },
                    "required": ["location"],
                },
            },
        }
    ]
    response = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
        max_completion_tokens=128,
    )
    response_message = response.choices[0].message
    tool_calls = response_message.tool_calls
    available_functions = {"get_current_weather": get_current_weather}
    messages.append(response_message)
    for tool_call in tool_calls:
        function_name = tool_call.function.name
        function_to_call = available_functions[function_name]
        function_args = json.loads(tool_call.function.arguments)
        function_response = function_to_call(**function_args)
        print(f"called {function_name}({function_args}) -> {function_response}")
        messages.append(
            {"tool_call_id": tool_call.id, "role": "tool", "name": function_name, "content": function_response}
        )
    second_response = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=64)
    return second_response.choices[0].message.content


print(run_conversation("What is the weather like in Paris today?"))
