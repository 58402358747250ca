-- What are the unprocessed events failing on, and how often were they retried?
SELECT coalesce(error, '(no error)') AS error,
       count(*) AS events,
       max(archived_attempts) AS max_attempts
FROM unprocessed
GROUP BY 1
ORDER BY events DESC;
