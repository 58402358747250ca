-- Unprocessed events per hour of event_time: when did the worker fall over?
SELECT date_trunc('hour', event_time) AS hour, count(*) AS unprocessed
FROM unprocessed
GROUP BY 1
ORDER BY 1;
