"""The pipeline benchmarks: SQuAD's answer metrics, and `ragdec bench qa` / `chat-pipeline`
end to end on a few records (real store, real smollm2)."""

from __future__ import annotations

import json

import pytest
from retrieval_fixtures import sample_records, write_jsonl

from ragdec.bench.qa import exact_match, f1_score, normalize_answer, strip_citations


def test_squad_normalization_and_metrics():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the eiffel tower.", "Eiffel Tower") == 1.0
    assert f1_score("It is the Eiffel Tower in Paris", "Eiffel Tower") == pytest.approx(0.5)  # precision 2/6, recall 1
    assert f1_score("nothing alike", "Eiffel Tower") == 0.0
    assert strip_citations("Tesla was born in 1856 [1]. He moved [2, 3].") == "Tesla was born in 1856. He moved."


@pytest.fixture
def data(tmp_path):
    records = sample_records(per_article=1)[:8]
    qa = tmp_path / "qa"
    qa.mkdir()
    write_jsonl(qa / "squad_passages.jsonl", records)
    write_jsonl(qa / "squad_questions.jsonl", [
        {"id": "1", "question": "In what year was Nikola Tesla born?", "answers": ["1856"], "passage_id": "Nikola_Tesla#0"},
        {"id": "2", "question": "Where did the black death originate?", "answers": ["Central Asia"], "passage_id": "Black_Death#0"},
    ])
    dialogue = tmp_path / "dialogue"
    dialogue.mkdir()
    story = "Anna has a red bike. She rides it to school every day. On Sundays she rides to the lake."
    turns = [{"question": "What does Anna have?", "answer": "a red bike"}, {"question": "Where does she ride it?", "answer": "to school"}]
    write_jsonl(dialogue / "coqa.jsonl", [{"id": "s1", "story": story, "turns": turns}])
    return tmp_path


def test_bench_qa_and_chat_pipeline_commands(data, tmp_path, capsys, weights):
    from ragdec.app.cli import main

    out = tmp_path / "qa.json"
    assert main(["bench", "qa", "--model", weights("smollm2-135m-instruct"), "--data", str(data), "--max-new-tokens", "16",
                 "-k", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["methods"]) == {"greedy", "llma"}
    for entry in result["methods"].values():
        assert set(entry) >= {"exact_match", "f1", "retrieval_hit_rate", "tokens_per_s", "speedup_vs_greedy", "identical_to_greedy", "ttft_s"}
    assert result["methods"]["llma"]["identical_to_greedy"] == 1.0
    assert result["methods"]["greedy"]["retrieval_hit_rate"] > 0

    out = tmp_path / "chat.json"
    # the story has 2 turns; by default 5 are asked: nothing to run is an error, not an empty result
    assert main(["bench", "chat-pipeline", "--model", "smollm2-135m-instruct", "--data", str(data), "--json", str(out)]) == 2
    assert "--turns" in capsys.readouterr().err
    assert main(["bench", "chat-pipeline", "--model", "smollm2-135m-instruct", "--data", str(data), "--max-new-tokens", "12",
                 "--turns", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["methods"]["llma"]["identical_to_greedy"] == 1.0
    assert len(result["methods"]["greedy"]["f1_per_turn"]) == 2
    assert "chat-pipeline" in capsys.readouterr().out


def test_bench_qa_refuses_hf_methods(data):
    from ragdec.app.cli import main

    assert main(["bench", "qa", "--methods", "hf-greedy,llma", "--data", str(data)]) == 2
