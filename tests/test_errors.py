"""run_main: our refusals as one line; a ValueError from outside rao_tune still one line, but naming its origin."""

import json

from rao_tune.losses import RAOLoss
from rao_tune.training.errors import REFUSED_EXIT_CODE, run_main


def test_a_refusal_of_ours_is_the_message_alone(capsys):
    code = run_main(lambda: RAOLoss(z0="sometimes"))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == REFUSED_EXIT_CODE
    assert last == "rao_tune error: RAOLoss: z0 must be a number or 'auto', got 'sometimes'"


def test_a_value_error_from_a_library_names_where_it_was_raised(capsys):
    code = run_main(lambda: json.loads("{"))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == REFUSED_EXIT_CODE
    assert last.startswith("rao_tune error: Expecting property name enclosed in double quotes")
    assert "(JSONDecodeError raised in " in last and "json/decoder.py:" in last
    assert last.endswith("RAO_TUNE_DEBUG=1 shows the traceback)")
