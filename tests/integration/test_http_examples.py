"""Every reference example in examples/groq/ runs unchanged on the groq SDK against the stack.

Only GROQ_BASE_URL and GROQ_API_KEY are set; the gateway's GATEWAY_MODEL_ALIASES maps the
reference's model names. They run together so the worker batches them.
"""

from tests.integration.examples import EXAMPLES, check_outcomes, run_examples
from tests.integration.stack import Stack


async def test_reference_groq_examples_run_unchanged(stack: Stack) -> None:
    env = {"GROQ_BASE_URL": stack.http_url, "GROQ_API_KEY": "unused-when-auth-is-off"}
    outcomes = await run_examples(EXAMPLES / "groq", env)
    check_outcomes(outcomes, json_error=("groq.BadRequestError", "json_validate_failed"))
