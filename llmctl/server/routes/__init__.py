"""The server's endpoints, one APIRouter per module; `llmctl.server.app` includes them all."""
