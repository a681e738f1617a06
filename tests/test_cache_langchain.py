"""The LangChain cache adapter passes langchain-tests' standard cache suites, on SQLite and
on PostgreSQL."""

from __future__ import annotations

import pytest
import pytest_asyncio
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, Generation
from langchain_tests.integration_tests import AsyncCacheTestSuite, SyncCacheTestSuite

from ragdec.cache.langchain import RagdecLLMCache
from ragdec.cache.store import QAStore


class TestRagdecLLMCacheSync(SyncCacheTestSuite):
    @pytest.fixture
    def cache(self, qa_location) -> RagdecLLMCache:
        return RagdecLLMCache(qa_location)


class TestRagdecLLMCacheAsync(AsyncCacheTestSuite):
    pytestmark = pytest.mark.asyncio  # the suite's tests are coroutines; pytest-asyncio runs them

    @pytest_asyncio.fixture
    async def cache(self, qa_location) -> RagdecLLMCache:
        return RagdecLLMCache(qa_location)


def test_generations_persist_exactly_per_prompt_and_model(qa_location):
    path = qa_location
    chat = [ChatGeneration(message=AIMessage(content="Paris."), generation_info={"finish_reason": "stop"})]
    RagdecLLMCache(path).update("Capital of France?", "model=a,temperature=0", chat)
    reopened = RagdecLLMCache(path)
    assert reopened.lookup("Capital of France?", "model=a,temperature=0") == chat
    assert reopened.lookup("Capital of France?", "model=b,temperature=0") is None
    assert reopened.lookup("capital of France?", "model=a,temperature=0") is None  # exact, as LangChain expects
    reopened.update("Capital of France?", "model=a,temperature=0", [Generation(text="Paris")])
    assert reopened.lookup("Capital of France?", "model=a,temperature=0") == [Generation(text="Paris")]
    store = QAStore.open(path)
    assert store.clear() == 0 and reopened.lookup("Capital of France?", "model=a,temperature=0") is None  # clear empties it too
