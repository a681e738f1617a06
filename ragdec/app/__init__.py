"""Apps: command line, server, LangChain classes."""
