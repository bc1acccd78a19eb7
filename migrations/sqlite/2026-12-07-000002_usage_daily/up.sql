-- See the PostgreSQL migration of the same version for the why.
CREATE TABLE usage_daily (
    day                  DATE NOT NULL,
    api_key_id           BIGINT NOT NULL,
    model                TEXT NOT NULL,
    turns                BIGINT NOT NULL,
    input_tokens         BIGINT NOT NULL,
    cached_input_tokens  BIGINT NOT NULL,
    cache_write_tokens   BIGINT NOT NULL,
    output_tokens        BIGINT NOT NULL,
    reasoning_tokens     BIGINT NOT NULL,
    cost_nanousd         BIGINT NOT NULL,
    PRIMARY KEY (day, api_key_id, model)
);

CREATE TRIGGER usage_daily_after_insert AFTER INSERT ON usage_logs
BEGIN
    INSERT INTO usage_daily (day, api_key_id, model, turns, input_tokens, cached_input_tokens,
        cache_write_tokens, output_tokens, reasoning_tokens, cost_nanousd)
    VALUES (date(NEW.accepted_at), NEW.api_key_id, NEW.model, 1, NEW.input_tokens,
        NEW.cached_input_tokens, NEW.cache_write_tokens, NEW.output_tokens,
        NEW.reasoning_tokens, NEW.cost_nanousd)
    ON CONFLICT (day, api_key_id, model) DO UPDATE SET
        turns = turns + 1,
        input_tokens = input_tokens + excluded.input_tokens,
        cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens,
        cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens,
        cost_nanousd = cost_nanousd + excluded.cost_nanousd;
END;

INSERT INTO usage_daily (day, api_key_id, model, turns, input_tokens, cached_input_tokens,
    cache_write_tokens, output_tokens, reasoning_tokens, cost_nanousd)
SELECT date(accepted_at), api_key_id, model, count(*), sum(input_tokens),
    sum(cached_input_tokens), sum(cache_write_tokens), sum(output_tokens), sum(reasoning_tokens),
    sum(cost_nanousd)
FROM usage_logs
WHERE true
GROUP BY 1, 2, 3;
