"""The LangChain classes pass langchain-tests' standard suites on real small models
(smollm2-135m-instruct answering over an all-minilm-l6-v2 store), and a RAG chain runs."""

from __future__ import annotations

import pytest
from app_fixtures import STORE_QUESTION, build_store
from langchain_core.messages import HumanMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests, EmbeddingsIntegrationTests, RetrieversIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests, EmbeddingsUnitTests

from ragdec.app.langchain import ChatRagdec, RagdecEmbeddings, RagdecLLM, RagdecRetriever, to_openai_messages

CHAT_MODEL = "smollm2-135m-instruct"
NO_TOOLS = "ragdec models answer in text: no tool calling, structured output or JSON mode"


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, minilm) -> str:
    return str(build_store(tmp_path_factory.mktemp("lc"), minilm))


class OnTheStore:
    """Puts the session's store folder on the suite class (the suites build models from
    class properties, not from fixtures)."""

    @pytest.fixture(autouse=True)
    def _store(self, store_dir):
        type(self).store = store_dir

    store: str = ""


class WithMinilm:
    """Puts the session's all-minilm-l6-v2 embedder on the suite class."""

    @pytest.fixture(autouse=True)
    def _embedder(self, minilm):
        type(self).embedder = minilm

    embedder = None


class RagdecChatParams(OnTheStore):
    """What the chat suites share: a small model over the store, short answers, no tools."""

    @property
    def chat_model_class(self):
        return ChatRagdec

    @property
    def chat_model_params(self) -> dict:
        return {"model": CHAT_MODEL, "store": self.store or None, "k": 1}

    @property
    def has_tool_calling(self) -> bool:
        return False  # NO_TOOLS

    @property
    def has_structured_output(self) -> bool:
        return False  # NO_TOOLS

    @property
    def supports_json_mode(self) -> bool:
        return False  # NO_TOOLS

    @property
    def supports_model_override(self) -> bool:
        return False  # each ChatRagdec holds one loaded model; another model is another instance

    @property
    def supports_image_inputs(self) -> bool:
        return False  # text-only models


class TestChatRagdecUnit(RagdecChatParams, ChatModelUnitTests):
    pass


class TestChatRagdecIntegration(RagdecChatParams, ChatModelIntegrationTests):

    @property
    def chat_model_params(self) -> dict:
        # short answers keep the suite fast (the unit suite passes its own max_tokens)
        return {**super().chat_model_params, "max_tokens": 10}


class TestRagdecRetriever(OnTheStore, RetrieversIntegrationTests):
    @property
    def retriever_constructor(self):
        return RagdecRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"store": self.store, "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return STORE_QUESTION


class TestRagdecEmbeddingsUnit(WithMinilm, EmbeddingsUnitTests):
    @property
    def embeddings_class(self):
        return RagdecEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"model": self.embedder}


class TestRagdecEmbeddingsIntegration(WithMinilm, EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self):
        return RagdecEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        return {"model": self.embedder}


# ---- beyond the suites ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_tokenizer) -> str:
    """A random 2-layer qwen2 saved as a local model folder (sizes in groups of 32, as int4
    needs): what every entry point loads by name, without the zoo's weights."""
    from conftest import tiny_causal_lm

    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_causal_lm("qwen2", len(tiny_tokenizer), hidden_size=64, intermediate_size=128).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return str(folder)


def test_the_chat_model_builds_the_stack_ragdec_ask_builds(tiny_folder):
    """One builder, one set of defaults: ``ChatRagdec()`` names the model, weights and
    router of `ragdec ask`, and both load int4 unless told otherwise."""
    import ragdec
    from ragdec.app.build import DEFAULT_DTYPE, DEFAULT_MODEL
    from ragdec.app.cli import build_parser
    from ragdec.app.cli_common import build_engine, stack_settings
    from ragdec.decoding.int4 import INT4, weights_name

    chat, ask = ChatRagdec().stack_settings(), stack_settings(build_parser().parse_args(["ask", "Why?", "--no-cache"]))
    assert DEFAULT_DTYPE == INT4
    assert (chat.model_name, chat.dtype, chat.default_method, chat.cache) == (ask.model_name, ask.dtype, ask.default_method, ask.cache)
    assert (chat.model_name, chat.dtype) == (DEFAULT_MODEL, INT4)
    assert ChatRagdec(dtype="float32").stack_settings().dtype == "float32"

    chat = ChatRagdec(model=tiny_folder, max_tokens=3, method="greedy")
    assert chat.invoke("hello").response_metadata["ragdec"]["stats"]["new_tokens"] > 0
    assert weights_name(chat.pipeline.engine.generator.model) == INT4  # what the chat model answered with
    assert ChatRagdec(model=tiny_folder)._pipeline().engine is chat.pipeline.engine  # one loaded model per process
    command = build_engine(build_parser().parse_args(["ask", "Why?", "--model", tiny_folder, "--no-cache"]))
    assert weights_name(command.generator.model) == INT4
    python_api = ragdec.build_stack(ragdec.StackSettings(model=tiny_folder, dtype="float32"))
    assert weights_name(python_api.engine.generator.model) == "float32"  # --dtype float32 stays possible everywhere



def test_temperature_above_zero_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="decodes greedily"):
        ChatRagdec(model=CHAT_MODEL, temperature=0.7)
    ChatRagdec(model=CHAT_MODEL, temperature=0)  # 0 and None are fine


def test_messages_merge_consecutive_roles_and_refuse_non_text():
    from langchain_core.messages import AIMessage, SystemMessage, ToolMessage

    merged = to_openai_messages([SystemMessage("a"), SystemMessage("b"), HumanMessage("hi"), AIMessage("yo"), HumanMessage("?")])
    assert merged == [{"role": "system", "content": "a\n\nb"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]
    with pytest.raises(ValueError, match="no tool calling"):
        to_openai_messages([ToolMessage("3", tool_call_id="x")])
    with pytest.raises(ValueError, match="text only"):
        to_openai_messages([HumanMessage([{"type": "image", "url": "http://x/y.png"}])])


def test_streamed_tokens_reach_the_callback_and_metadata_carries_sources(store_dir):
    from langchain_core.callbacks import BaseCallbackHandler

    class Tokens(BaseCallbackHandler):
        def __init__(self):
            self.tokens = []

        def on_llm_new_token(self, token, **kwargs):
            self.tokens.append(token)

    handler = Tokens()
    chat = ChatRagdec(model=CHAT_MODEL, store=store_dir, k=2, max_tokens=12, method="llma")
    message = chat.invoke(STORE_QUESTION, config={"callbacks": [handler]})
    assert handler.tokens and "".join(handler.tokens) == message.content
    ragdec = message.response_metadata["ragdec"]
    assert ragdec["method"] == "llma" and any(s["title"] == "Nikola Tesla" for s in ragdec["sources"])
    assert ragdec["stats"]["new_tokens"] == message.usage_metadata["output_tokens"]
    greedy = ChatRagdec(model=CHAT_MODEL, store=store_dir, k=2, max_tokens=12, method="greedy").invoke(STORE_QUESTION)
    assert greedy.content == message.content  # the copy decoder is lossless


def test_stop_timeout_and_wrong_model_say_what_happened(weights):
    chat = ChatRagdec(model=weights(CHAT_MODEL), max_tokens=10)
    full = chat.invoke("Count from one to ten.").content
    stop = full.split()[2]  # a word inside the answer
    cut = chat.invoke("Count from one to ten.", stop=[stop]).content
    assert cut == full[: full.index(stop)] and len(cut) < len(full)
    with pytest.raises(TimeoutError, match="raise the timeout"):
        ChatRagdec(model=CHAT_MODEL, max_tokens=10, timeout=0.0).invoke("Count from one to ten.")
    with pytest.raises(ValueError, match="make another ChatRagdec"):
        chat.invoke("hi", model="another-model")


def test_llm_wrapper_streams_the_chat_models_answer(weights):
    llm = RagdecLLM(model=weights(CHAT_MODEL), max_tokens=8)
    chat = ChatRagdec(model=CHAT_MODEL, max_tokens=8)
    text = llm.invoke("Name a planet.")
    assert text and text == chat.invoke("Name a planet.").content
    assert "".join(llm.stream("Name a planet.")) == text
    assert llm._identifying_params["model_name"] == CHAT_MODEL


def test_rag_chain_over_a_ragdec_store(store_dir):
    """The README's example: retriever -> prompt -> chat model -> text."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnablePassthrough

    retriever = RagdecRetriever(store=store_dir, k=2)
    prompt = ChatPromptTemplate.from_messages([
        ("system", "Answer from the context in one sentence.\n\nContext:\n{context}"),
        ("human", "{question}"),
    ])

    def join(docs):
        return "\n\n".join(doc.page_content for doc in docs)

    chat = ChatRagdec(model=CHAT_MODEL, max_tokens=12, method="llma")  # llma: copies from the context in the prompt
    chain = {"context": retriever | join, "question": RunnablePassthrough()} | prompt | chat | StrOutputParser()
    answer = chain.invoke(STORE_QUESTION)
    assert isinstance(answer, str) and answer.strip()
