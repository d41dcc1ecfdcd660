# The reference description's cURL example, verbatim (run with bash; the tests check its output).
curl -X POST "http://localhost:8000/generate" \
  -H "Content-Type: application/json" \
  -d '{
    "prompts": ["baroque oil painting, dramatic chiaroscuro lighting, a weathered stone tablet with ancient text"],
    "negative_prompt": "modern, low quality",
    "return_format": "base64"
  }'
