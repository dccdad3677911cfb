"""Each reference example in examples/ runs against the stack, unchanged but for import and constructor.

They run together so the worker batches them (each asks for up to 1,024 tokens).
"""

from tests.integration.examples import EXAMPLES, check_outcomes, run_examples
from tests.integration.stack import Stack


async def test_reference_examples_run_against_the_service(stack: Stack) -> None:
    outcomes = await run_examples(EXAMPLES, {"CHAT_SERVICE_ADDRESS": stack.address})
    check_outcomes(outcomes, json_error=("BadRequestError", "JSON mode"))
