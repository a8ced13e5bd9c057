import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  createMediaTypeMatcher,
  essence,
  isEventStream,
  JSON_MEDIA_TYPES,
} from '../../src/core/media-type.js';

describe('isEventStream', () => {
  it.each([
    'text/event-stream',
    'Text/Event-Stream',
    ' TEXT/EVENT-STREAM ; charset=utf-8',
    'text/event-stream;x=1',
  ])('recognises %s', (type) => {
    expect(isEventStream(type)).toBe(true);
  });

  it.each([
    undefined,
    '',
    'application/json',
    'application/x-event-stream',
    'text/event-streams',
    'text/plain; note=event-stream',
  ])('refuses %s', (type) => {
    expect(isEventStream(type)).toBe(false);
  });
});

describe('essence', () => {
  it('drops parameters, trims and lower-cases', () => {
    expect(essence('Application/JSON; charset=utf-8')).toBe('application/json');
    expect(essence('  text/plain ;format=flowed')).toBe('text/plain');
    expect(essence('application/json')).toBe('application/json');
  });
});

describe('createMediaTypeMatcher', () => {
  it('answers every type, repeated or not, and past its memo, as a matcher asked for the first time does', () => {
    const pool = ['application/json', 'text/plain', 'application/problem+json', 'text/event-stream', ''];
    const types = fc.oneof(fc.constantFrom(...pool), fc.string({ maxLength: 30 }));
    for (const patterns of [JSON_MEDIA_TYPES, '*', ['text/*']] as const) {
      const matches = createMediaTypeMatcher(patterns);
      fc.assert(
        fc.property(fc.array(types, { maxLength: 200 }), (sequence) => {
          for (const type of sequence) expect(matches(type)).toBe(createMediaTypeMatcher(patterns)(type));
        }),
        { numRuns: 50 },
      );
    }
  });

  describe('the default (JSON only)', () => {
    const matches = createMediaTypeMatcher(JSON_MEDIA_TYPES);

    it.each([
      'application/json',
      'Application/JSON; charset=utf-8',
      'application/json;charset=UTF-8',
      ' application/json ',
      'application/problem+json',
      'application/vnd.api+json',
      'application/merge-patch+json; charset=utf-8',
      'application/ld+json',
    ])('accepts %s', (type) => {
      expect(matches(type)).toBe(true);
    });

    it.each([
      'text/plain',
      'text/html; charset=utf-8',
      'text/event-stream',
      'application/x-ndjson',
      'application/jsonp',
      'application/json-seq',
      'application/xml',
      'application/octet-stream',
      'multipart/form-data; boundary=x',
      '',
    ])('refuses %j', (type) => {
      expect(matches(type)).toBe(false);
    });

    it('refuses a response without a content type', () => {
      expect(matches(undefined)).toBe(false);
    });
  });

  describe("'*'", () => {
    const matches = createMediaTypeMatcher('*');

    it.each([
      'application/json',
      'text/plain',
      'text/html; charset=utf-8',
      'image/png',
      'application/octet-stream',
    ])('accepts %s', (type) => {
      expect(matches(type)).toBe(true);
    });

    it('accepts a response without a content type', () => {
      expect(matches(undefined)).toBe(true);
    });

    it.each(['text/event-stream', 'text/event-stream; charset=utf-8', 'Text/Event-Stream'])(
      'refuses %s',
      (type) => {
        expect(matches(type)).toBe(false);
      },
    );
  });

  describe('a list of patterns', () => {
    it('matches a whole type with type/*', () => {
      const matches = createMediaTypeMatcher(['text/*']);
      expect(matches('text/plain')).toBe(true);
      expect(matches('Text/CSV; charset=utf-8')).toBe(true);
      expect(matches('text/html')).toBe(true);
      expect(matches('application/json')).toBe(false);
      expect(matches('textual/plain')).toBe(false);
      expect(matches(undefined)).toBe(false);
    });

    it('never matches text/event-stream, even under text/*', () => {
      expect(createMediaTypeMatcher(['text/*'])('text/event-stream')).toBe(false);
      expect(createMediaTypeMatcher(['text/event-stream'])('text/event-stream; charset=utf-8')).toBe(false);
    });

    it('matches exact types, ignoring case and parameters', () => {
      const matches = createMediaTypeMatcher(['application/xml', 'Text/Plain']);
      expect(matches('application/xml')).toBe(true);
      expect(matches('APPLICATION/XML; charset=utf-8')).toBe(true);
      expect(matches('text/plain')).toBe(true);
      expect(matches('text/html')).toBe(false);
      expect(matches('application/json')).toBe(false);
      expect(matches('application/xml-dtd')).toBe(false);
    });

    it('matches a structured-syntax suffix with */*+suffix', () => {
      const matches = createMediaTypeMatcher(['*/*+xml']);
      expect(matches('application/atom+xml')).toBe(true);
      expect(matches('image/svg+xml; charset=utf-8')).toBe(true);
      expect(matches('application/xml')).toBe(false);
      expect(matches('application/json')).toBe(false);
    });

    it('matches every type but text/event-stream with */*', () => {
      const matches = createMediaTypeMatcher(['*/*']);
      expect(matches('image/png')).toBe(true);
      expect(matches('application/json')).toBe(true);
      expect(matches('text/event-stream')).toBe(false);
    });

    it('combines patterns', () => {
      const matches = createMediaTypeMatcher(['application/json', 'text/*', '*/*+json']);
      expect(matches('application/json')).toBe(true);
      expect(matches('text/csv')).toBe(true);
      expect(matches('application/problem+json')).toBe(true);
      expect(matches('image/png')).toBe(false);
    });

    it('matches nothing when empty', () => {
      const matches = createMediaTypeMatcher([]);
      expect(matches('application/json')).toBe(false);
      expect(matches(undefined)).toBe(false);
    });
  });
});
